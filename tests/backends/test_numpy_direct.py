"""The NumPy backend's direct convolution (backends/numpy/direct.py: C generated per shape, built
with the system C compiler): float64 central finite differences on that path, im2col's results
in float32 and float64 split over two threads, where it applies, and what happens without a
compiler or with CNNC_JIT=0 (the plain NumPy algorithms only)."""

from __future__ import annotations

import numpy as np
import pytest

from test_numpy_grad import Case, make_node, make_params
from test_numpy_grad import test_backward_matches_finite_differences as finite_differences

from cnnc.backends.base import Ctx
from cnnc.backends.numpy import cc, conv, cthreads, direct, parallel

if not direct.available():
    pytest.skip("no C compiler (cc) on this machine: the direct convolution is not built",
                allow_module_level=True)

# vector widths (8 float32, 4 float64 outputs) with and without a partial last block; blocks of 6,
# 4 and 1 (a prime K) output channels, weight-gradient blocks of 1 and 4; padding wider than the
# kernel's reach (dx pads negatively)
CASES = [
    Case("direct-3x3-same", "conv", dict(filters=8, kernel=3, pad=1), [(3, 6, 6)]),
    Case("direct-3x3-wide", "conv", dict(filters=8, kernel=3, pad=1), [(2, 3, 10)]),  # dW in blocks of 4 filters
    Case("direct-5x5-valid-k6", "conv", dict(filters=6, kernel=5), [(2, 9, 10)]),
    Case("direct-1x3-asym-k4", "conv", dict(filters=4, kernel=(1, 3), pad=(0, 0, 1, 2)), [(5, 3, 5)]),
    Case("direct-3x3-bigpad-k17", "conv", dict(filters=17, kernel=3, pad=(3, 0, 1, 2), bias=False), [(2, 4, 5)]),
    Case("direct-2x2-k12", "conv", dict(filters=12, kernel=2, pad=(1, 0, 0, 1)), [(3, 5, 7)]),
    # strides: the input in phases, dx one stride-1 conv per phase (a 1×1 kernel reads one phase only)
    Case("direct-3x3-s2", "conv", dict(filters=8, kernel=3, stride=2, pad=1), [(3, 9, 17)]),
    Case("direct-1x1-s2-floor", "conv", dict(filters=4, kernel=1, stride=2, round="floor"), [(5, 6, 16)]),
    Case("direct-5x5-s3-asym", "conv", dict(filters=6, kernel=5, stride=(3, 2), pad=(2, 1, 0, 2), round="floor"),
         [(2, 11, 12)]),
    Case("direct-fused-relu", "fused_conv", dict(filters=8, kernel=3, pad=1, activation="relu", residual=True),
         [(4, 5, 6), (8, 5, 6)]),
]


@pytest.fixture(params=["rows", "flat", "spill"])
def direct_path(request, monkeypatch):
    """Every conv takes the direct algorithm (it applies to all CASES), on either layout."""
    monkeypatch.setattr(conv, "_algorithm", lambda node, x, w, bias, ctx: "direct")
    monkeypatch.setattr(direct, "LAYOUT", request.param)
    calls = []
    forward = direct.conv
    monkeypatch.setattr(direct, "conv", lambda *a: calls.append(a[0].planes.shape) or forward(*a))
    return calls


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_direct_backward_matches_finite_differences(case, direct_path):
    node, _ = make_node(case.op, case.kw, case.shapes)
    assert direct.applies(node, case.shapes[0][0], np.float64)
    finite_differences(case)
    assert direct_path  # the compiled kernels ran


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 16, 16, 12, 3, 1, 1), (4, 1, 6, 16, 5, 0, 1), (3, 6, 16, 10, 5, 2, 1),
                                   (2, 64, 64, 8, 3, 1, 1), (3, 16, 32, 32, 3, 1, 2), (2, 32, 64, 16, 1, 0, 2),
                                   (1, 16, 16, 12, 3, 1, 1), (1, 3, 17, 10, 3, 1, 1), (13, 64, 32, 8, 3, 1, 1),
                                   (2, 24, 16, 7, 3, 1, 1), (2, 8, 16, 7, 3, 1, 2), (2, 8, 16, 27, 3, 1, 2),
                                   (3, 16, 24, 14, 1, 0, 1)],
                         ids=["16c", "lenet-c1", "lenet-c3-pad", "64c", "down-3x3-s2", "shortcut-1x1-s2",
                              "batch1-filters-split", "batch1-k17", "dw-image-blocks", "7x7-flat", "7x7-s2-flat",
                              "14-wide-s2", "1x1-input-as-plane"])
@pytest.mark.parametrize("avx512", [False, True], ids=["avx2-blocks", "avx512-blocks"])
@pytest.mark.parametrize("layout", ["rows", "flat", "spill"])
def test_direct_equals_im2col_split_over_threads(shape, dtype, avx512, layout, monkeypatch):
    """Output, input gradient, weight and bias gradients equal im2col's (float32 to 2e-6, float64 to
    1e-13), on one thread and with the batch (one image: the filters) split over two; with AVX2's
    and AVX-512's vectors and blocks (the compiler splits 64-byte vectors where the CPU has no
    AVX-512, so both run on any machine)."""
    monkeypatch.setattr(direct, "_avx512", lambda: avx512)
    monkeypatch.setattr(direct, "LAYOUT", layout)
    n, c, k, size, kernel, pad, stride = shape
    node, specs = make_node("conv", dict(filters=k, kernel=kernel, pad=pad, stride=stride, round="floor"),
                            [(c, size, size)])
    rng = np.random.default_rng(sum(shape))
    params = make_params(specs, rng, dtype)
    w, b = params["weight"], params["bias"]
    x = rng.normal(size=(n, c, size, size)).astype(dtype)
    y0, s0 = conv._forward(node, "im2col", x, w, b)
    dy = rng.normal(size=y0.shape).astype(dtype)
    (dx0,), p0 = conv._backward(node, s0, dy, w, True, True)
    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    monkeypatch.setattr(cthreads, "MIN_WORK", 0)
    before = parallel.get_threads()
    tol = 2e-6 if dtype == np.float32 else 1e-13
    try:
        for threads in (1, 2):
            parallel.set_threads(threads)
            y1, s1 = conv._forward(node, "direct", x, w, b)
            assert s1[0] == "direct" and y1.dtype == dtype
            (dx1,), p1 = conv._backward(node, s1, dy, w, True, True)
            for got, want in [(y1, y0), (dx1, dx0), (p1["weight"], p0["weight"]), (p1["bias"], p0["bias"])]:
                assert got.dtype == dtype
                assert float(np.abs(got - want).max() / np.abs(want).max()) <= tol
    finally:
        parallel.set_threads(before)


def test_where_it_applies():
    def node(**kw):
        return make_node("conv", dict(filters=8, kernel=3, **kw), [(4, 12, 12)])[0]
    assert direct.applies(node(pad=1), 4, np.float32)
    wide = make_node("conv", dict(filters=8, kernel=3, stride=2, pad=1, round="floor"), [(4, 12, 17)])[0]  # 9 wide
    assert direct.applies(wide, 4, np.float32)
    assert direct.applies(node(stride=2, pad=1, round="floor"), 4, np.float32)  # 6 a row: the flat layout
    assert not direct.applies(node(dilation=2), 4, np.float32)
    assert not direct.applies(make_node("conv", dict(filters=8, kernel=3, groups=2), [(4, 12, 12)])[0], 4, np.float32)
    tiny = make_node("conv", dict(filters=8, kernel=3), [(4, 4, 5)])[0]  # 2×3 outputs
    assert not direct.applies(tiny, 4, np.float32) and direct.applies(tiny, 4, np.float64)
    assert conv.algorithms(node(pad=1), 4, True)[0] == "direct"
    assert conv.algorithms(node(stride=2, pad=1, round="floor"), 4, True)[0] == "direct"
    pointwise = make_node("conv", dict(filters=8, kernel=1), [(4, 12, 12)])[0]
    assert conv.algorithms(pointwise, 4, True)[1] == "direct"  # one gemm already; timed in fast mode
    shortcut = make_node("conv", dict(filters=8, kernel=1, stride=2, round="floor"), [(4, 12, 12)])[0]
    assert conv.algorithms(shortcut, 4, True)[0] == "direct"
    many = make_node("conv", dict(filters=128, kernel=3, stride=2, pad=1, round="floor"), [(64, 12, 12)])[0]
    assert conv.algorithms(many, 64, True)[1] == "direct"  # above DIRECT_MAX_CHANNELS


def test_without_a_compiler_or_with_jit_off_the_numpy_algorithms_remain(monkeypatch):
    node = make_node("conv", dict(filters=8, kernel=3, pad=1), [(4, 12, 12)])[0]
    monkeypatch.setenv("CNNC_JIT", "0")
    assert not direct.available() and "direct" not in conv.algorithms(node, 4, True)
    monkeypatch.setenv("CNNC_JIT", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    direct._compiler.cache_clear()
    try:
        assert not direct.available() and "direct" not in conv.algorithms(node, 4, True)
    finally:
        monkeypatch.delenv("CC")
        direct._compiler.cache_clear()
    assert direct.available()


def test_a_failing_compiler_turns_the_direct_conv_off_with_one_message(tmp_path, monkeypatch, capsys):
    """A C compiler that is there but fails (a broken toolchain): the conv still computes, by im2col,
    and the process says once why."""
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cc, "_broken", None)
    caches = (direct._compiler, direct.kernels, direct._pack_kernels)  # libraries an earlier test built
    for cache in caches:
        cache.cache_clear()
    try:
        node, specs = make_node("conv", dict(filters=8, kernel=3, pad=1), [(4, 12, 12)])
        params = make_params(specs, np.random.default_rng(0), np.float32)
        x = np.random.default_rng(1).normal(size=(2, 4, 12, 12)).astype(np.float32)
        assert direct.available() and conv.algorithms(node, 4, True)[0] == "direct"
        y, saved = conv._forward(node, "direct", x, params["weight"], params["bias"])
        y2, _ = conv._forward(node, "direct", x, params["weight"], params["bias"])
        want, _ = conv._forward(node, "im2col", x, params["weight"], params["bias"])
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(y2, want)
        assert not isinstance(saved[0], str)  # im2col's, so its backward runs too
        assert not direct.available() and "direct" not in conv.algorithms(node, 4, True)
        err = capsys.readouterr().err
        assert err.count("failed on a generated kernel: cc: fatal error: no input files") == 1
        assert "the NumPy kernels run instead" in err
    finally:
        for cache in caches:
            cache.cache_clear()


def test_the_library_is_built_once_per_shape_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    direct.kernels.cache_clear()
    x = np.ones((2, 3, 10, 10), np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    try:
        y = direct.conv(direct.pack(x, 4, 3, 3, (8, 8)), w)
        libs = sorted((tmp_path / "c").glob("*.so"))
        assert len(libs) == 1 and not list((tmp_path / "c").glob(".*"))  # no temporaries left
        mtime = libs[0].stat().st_mtime_ns
        direct.kernels.cache_clear()
        np.testing.assert_array_equal(direct.conv(direct.pack(x, 4, 3, 3, (8, 8)), w), y)
        assert libs[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
        np.testing.assert_array_equal(y, np.full((2, 4, 8, 8), 27.0, np.float32))
    finally:
        direct.kernels.cache_clear()


def test_a_training_step_runs_the_direct_path_when_the_tuner_picks_it(monkeypatch):
    """conv_forward / conv_backward through the kernel table with the algorithm chosen as direct."""
    from test_numpy_grad import BACKEND
    monkeypatch.setattr(conv, "_algorithm", lambda node, x, w, bias, ctx: "direct")
    node, specs = make_node("conv", dict(filters=8, kernel=3, pad=1), [(4, 12, 12)])
    rng = np.random.default_rng(0)
    params = make_params(specs, rng, np.float32)
    x = rng.normal(size=(2, 4, 12, 12)).astype(np.float32)
    k = BACKEND.kernel("conv")
    y, saved = k.forward(node, [x], params, Ctx(training=True))
    assert saved[0] == "direct"
    (dx,), dps = k.backward(node, saved, np.ones_like(y), params, Ctx(training=True, need_input_grad=False))
    assert dx is None and sorted(dps) == ["bias", "weight"]


def test_the_layout_for_narrow_maps_on_avx512(monkeypatch):
    """Rows of 12-15 floats spill over on AVX-512; narrower ones with enough multiply-adds per
    packed value go flat; AVX2 keeps rows (its 8-float vectors fill them), as does any row of 16
    or more; rows narrower than 8 are always flat."""
    monkeypatch.setattr(direct, "_avx512", lambda: True)
    assert direct.layout(np.float32, 8, 8, 64, 3, 3) == "flat"  # ResNet-20's 64@8²
    assert direct.layout(np.float32, 10, 10, 16, 5, 5) == "flat"  # LeNet-5's C3
    assert direct.layout(np.float32, 14, 14, 6, 5, 5) == "spill"  # C3's input gradient
    assert direct.layout(np.float32, 10, 10, 6, 5, 5) == "rows"  # 30 multiply-adds a packed value
    assert direct.layout(np.float32, 16, 16, 32, 3, 3) == "rows"  # rows fill a vector
    assert direct.layout(np.float64, 4, 4, 64, 3, 3) == "flat" and direct.layout(np.float64, 6, 6, 64, 3, 3) == "spill"
    assert direct.layout(np.float32, 7, 7, 8, 3, 3) == "flat"
    assert direct.layout(np.float32, 14, 14, 256, 1, 1) == "flat"  # 1×1: flat planes are the input
    monkeypatch.setattr(direct, "_avx512", lambda: False)
    assert direct.layout(np.float32, 8, 8, 64, 3, 3) == "rows" and direct.layout(np.float32, 14, 14, 6, 5, 5) == "rows"
    assert direct.layout(np.float32, 7, 7, 8, 3, 3) == "flat"


def test_a_1x1_conv_reads_its_input_as_its_plane(monkeypatch):
    """No copy where the planes would equal the input; a copy wherever a layout reads past it."""
    x = np.random.default_rng(0).normal(size=(2, 8, 14, 14)).astype(np.float32)
    for layout in ("rows", "flat"):
        monkeypatch.setattr(direct, "LAYOUT", layout)
        assert np.shares_memory(direct.pack(x, 16, 1, 1, (14, 14)).planes, x)
    monkeypatch.setattr(direct, "LAYOUT", "spill")  # its reads run a vector past the planes
    assert not np.shares_memory(direct.pack(x, 16, 1, 1, (14, 14)).planes, x)
    assert not np.shares_memory(direct.pack(x, 16, 1, 1, (7, 7), (2, 2)).planes, x)  # strided: a phase
