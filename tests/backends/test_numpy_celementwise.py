"""The C element-wise loops (backends/numpy/celementwise.py): gradients and the fused epilogue.

Every op with a formula: its C gradient loop, where it has one, gives NumPy's rendering's bits
(float32 and float64, on one thread and split over two, with values at the kinks, zeros of both
signs, infinities and a NaN); the fused epilogue's C pass (every bias/residual combination, every
activation, in place and with the pre-activation kept) gives the plain NumPy blocks' bits. Float64
finite differences on the compiled path for the fused conv's epilogue gradients. With CNNC_JIT=0 or
no working compiler, nothing runs in C and the NumPy path computes.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from test_numpy_grad import Case
from test_numpy_grad import test_backward_matches_finite_differences as finite_differences

from cnnc.backends.numpy import cc, celementwise, fused, parallel
from cnnc.backends.numpy import elementwise as ew
from cnnc.compiler.ops import OPS

pytestmark = pytest.mark.skipif(not cc.available(), reason="no C compiler (cc) on this machine")

FORMULA_OPS = sorted(op for op in OPS if OPS[op].formula is not None)
ARGS = {"leaky_relu": (0.2,), "elu": (0.4,)}


def _args(op: str) -> tuple[float, ...]:
    params = OPS[op].formula.params
    return ARGS.get(op, tuple(0.3 for _ in params))[:len(params)]


def _values(shape, dtype, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = (rng.normal(size=shape) * 4).astype(dtype)
    v.reshape(-1)[:10] = [0.0, -0.0, 6.0, -3.0, 3.0, 1.0, -1.0, np.inf, -np.inf, np.nan]
    return v


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(parallel, "_threads", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", FORMULA_OPS)
def test_gradient_loop_equals_numpy(op, dtype, threads, monkeypatch):
    """The C loop gives NumPy's bits where NumPy's derivative has the dtype (or is a mask); within
    an ulp where NumPy promotes it."""
    monkeypatch.setenv("CNNC_JIT", "1")
    f = OPS[op].formula
    if not celementwise.has_gradient_loop(op):
        assert not celementwise.renderable(f.grad)  # a NumPy SIMD function: NumPy computes it
        pytest.skip(f"{op}'s derivative calls one of NumPy's SIMD functions")
    shape = (7, 5, 40, 41)  # 57,400 elements: split over two threads
    seed = zlib.crc32(f"{op}{dtype.__name__}".encode())
    x = _values(shape, dtype, seed)
    args = _args(op)
    with np.errstate(all="ignore"):
        y = ew.apply(op, args, x)
    dy = _values(shape, dtype, seed + 1)
    reads = f.grad_reads
    xs, ys = (x if "input" in reads else None), (y if "output" in reads else None)
    out = np.full(shape, 7.0, dtype)
    with np.errstate(all="ignore"):
        assert celementwise.gradient(op, args, xs, ys, dy, out)
        want = ew.grad(op, args, xs, ys, dy)
        d = np.asarray(ew.derivative(op)(xs, ys, *args))
    if d.dtype in (np.bool_, dtype):
        np.testing.assert_array_equal(out, want)
    else:
        # NumPy promotes the derivative (a mask over a Python number: hardsigmoid's /6, leaky_relu's
        # where(x > 0, 1, slope)) to float64 and rounds dy·f' once; the loop, like fused_bn's, stays
        # in the dtype: the two differ in the last place at most
        assert dtype == np.float32 and d.dtype == np.float64
        np.testing.assert_allclose(out, want, rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True), (False, False)],
                         ids=["bias", "residual", "both", "neither"])
@pytest.mark.parametrize("op", FORMULA_OPS + [None])
def test_epilogue_equals_numpys_blocks_to_the_bit(op, bias, residual, dtype, threads, monkeypatch):
    """fused.epilogue with the C pass against the plain NumPy blocks: the activation in C where it is
    rendered, after the C bias and residual in NumPy where it calls NumPy's SIMD functions."""
    act = None if op is None else (op, _args(op))
    if not (bias or residual or act):
        pytest.skip("nothing to do: the epilogue returns y")
    seed = zlib.crc32(f"{op}{bias}{residual}{dtype.__name__}".encode())
    y0 = _values((6, 5, 30, 31), dtype, seed)
    rng = np.random.default_rng(seed)
    b = rng.normal(size=5).astype(dtype) if bias else None
    r = rng.normal(size=y0.shape).astype(dtype) if residual else None
    results, ran = [], []
    c_epilogue = celementwise.epilogue
    monkeypatch.setattr(celementwise, "epilogue", lambda *a: ran.append(c_epilogue(*a)) or ran[-1])
    for on in ("0", "1"):
        monkeypatch.setenv("CNNC_JIT", on)
        with np.errstate(all="ignore"):
            results.append(fused.epilogue(y0.copy(), b, r, act))
    whole = op is None or celementwise.renderable(OPS[op].formula.fwd)
    assert ran == [None, "all" if whole else "affine" if bias or residual else None]
    (out0, pre0), (out1, pre1) = results
    np.testing.assert_array_equal(out1, out0)
    assert (pre0 is None) == (pre1 is None) == ("input" not in fused._reads(act))
    if pre0 is not None:
        np.testing.assert_array_equal(pre1, pre0)


def test_rendered_formulas_cover_the_piecewise_and_arithmetic_ones():
    """tanh's and sigmoid's derivatives (1 − y², y·(1 − y)) and the piecewise ones run in C; silu's and
    gelu's, which call NumPy's exp and erf, do not."""
    for op in ("tanh", "sigmoid", "relu", "relu6", "leaky_relu", "hardswish", "hardsigmoid"):
        assert celementwise.has_gradient_loop(op), op
    for op in ("silu", "gelu"):
        assert not celementwise.has_gradient_loop(op), op


# the fused conv's epilogue gradient on the compiled path: float64 central finite differences
FUSED = [
    Case("fused_conv-tanh", "fused_conv", dict(filters=4, kernel=3, pad=1, activation="tanh"), [(3, 6, 6)]),
    Case("fused_conv-relu6-residual", "fused_conv", dict(filters=4, kernel=3, pad=1, activation="relu6",
                                                         residual=True), [(3, 6, 6), (4, 6, 6)], scale=4.0),
    Case("fused_conv-leaky_relu", "fused_conv", dict(filters=4, kernel=3, activation="leaky_relu",
                                                     act_args=(0.2,)), [(3, 6, 6)]),
    Case("fused_conv-hardswish-residual", "fused_conv", dict(filters=3, kernel=1, activation="hardswish",
                                                             residual=True), [(3, 5, 5), (3, 5, 5)], scale=3.0),
    Case("fused_conv-silu-residual", "fused_conv", dict(filters=3, kernel=1, activation="silu", residual=True),
         [(3, 5, 5), (3, 5, 5)]),
    Case("fused_conv-relu-nobias", "fused_conv", dict(filters=4, kernel=3, pad=1, activation="relu", bias=False),
         [(3, 6, 6)]),
    Case("fused_conv-residual-nobias", "fused_conv", dict(filters=4, kernel=1, residual=True, bias=False),
         [(3, 6, 6), (4, 6, 6)]),
]


@pytest.mark.parametrize("case", FUSED, ids=[c.id for c in FUSED])
def test_compiled_fused_conv_matches_finite_differences(case, monkeypatch):
    monkeypatch.setenv("CNNC_JIT", "1")
    finite_differences(case)


def test_jit_off_or_no_compiler_leaves_it_to_numpy(monkeypatch):
    y = np.ones((2, 3, 4, 4), np.float32)
    out = np.empty_like(y)
    monkeypatch.setenv("CNNC_JIT", "0")
    assert not celementwise.gradient("tanh", (), None, y, y, out)
    assert celementwise.epilogue(y, np.ones(3, np.float32), None, ("relu", ()), y) is None
    monkeypatch.setenv("CNNC_JIT", "1")
    monkeypatch.setattr(cc, "_broken", "the compiler failed")
    assert not celementwise.gradient("tanh", (), None, y, y, out)
    assert celementwise.epilogue(y, np.ones(3, np.float32), None, ("relu", ()), y) is None
