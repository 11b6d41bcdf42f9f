"""Winograd F(2×2, 3×3)'s transforms in C (backends/numpy/winograd.py) against its NumPy ones.

The input transform (a contiguous grid, and conv.py's padded buffer whose channels have a tail)
and the output transform (with and without a bias, maps that crop a tile's second row and column)
give the NumPy slices' values to the bit, float32 and float64, on one thread and split over two;
a whole 3×3 conv through them stays within float rounding of a direct float64 sum.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends.numpy import cc, cthreads, parallel, winograd

pytestmark = pytest.mark.skipif(not cc.available(), reason="no C compiler (cc) on this machine")

SHAPES = [(5, 3, 7), (16, 2, 8), (4, 2, 56), (2, 1, 33), (3, 2, 64)]  # (channels, images, map side)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(parallel, "_threads", request.param)
    monkeypatch.setattr(cthreads, "MIN_WORK", 0)
    return request.param


def _both(monkeypatch, fn):
    out = []
    for jit in ("0", "1"):
        monkeypatch.setenv("CNNC_JIT", jit)
        out.append(fn())
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("tail", [0, 11], ids=["contiguous", "channel-tail"])
@pytest.mark.parametrize("c,n,side", SHAPES)
def test_input_transform_equals_numpys_to_the_bit(c, n, side, tail, dtype, threads, monkeypatch):
    th, tw = winograd.tiles(side, side)
    hg, wg = winograd.grid(side, side, side + 2, side + 2)
    buf = np.random.default_rng(side).normal(size=(c, n * hg * wg + tail)).astype(dtype)
    xg = buf[:, :n * hg * wg].reshape(c, n, hg, wg)
    plain, compiled = _both(monkeypatch, lambda: winograd.input_transform(xg, th, tw))
    np.testing.assert_array_equal(compiled, plain)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k,n,side", SHAPES)
def test_output_transform_equals_numpys_to_the_bit(k, n, side, bias, dtype, threads, monkeypatch):
    th, tw = winograd.tiles(side, side)
    rng = np.random.default_rng(k * side)
    m = rng.normal(size=(16, k, n * th * tw)).astype(dtype)
    b = rng.normal(size=k).astype(dtype) if bias else None
    plain, compiled = _both(monkeypatch, lambda: winograd.output_transform(m, n, th, tw, side, side, b))
    assert compiled.shape == (n, k, side, side) and compiled.flags.c_contiguous
    np.testing.assert_array_equal(compiled, plain)


def test_a_conv_through_the_c_transforms_is_the_direct_sum(monkeypatch):
    monkeypatch.setenv("CNNC_JIT", "1")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 9, 9))
    w = rng.normal(size=(5, 6, 3, 3))
    th, tw = winograd.tiles(9, 9)
    hg, wg = winograd.grid(9, 9, 11, 11)
    xg = np.zeros((6, 2, hg, wg))
    xg[:, :, 1:10, 1:10] = x.transpose(1, 0, 2, 3)
    y = winograd.conv3x3(xg, winograd.filter_transform(w), 9, 9)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((2, 5, 9, 9))
    for i in range(3):
        for j in range(3):
            want += np.einsum("nchw,kc->nkhw", xp[:, :, i:i + 9, j:j + 9], w[:, :, i, j])
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
