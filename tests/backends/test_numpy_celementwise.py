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
    if not celementwise.has_gradient_loop(op, dtype.__name__):
        pytest.skip(f"{op}: not rendered here (erf without SciPy)")
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
@pytest.mark.parametrize("shape", [(6, 5, 30, 31), (37, 5), (9, 5, 1, 1)], ids=["maps", "dense", "1x1"])
@pytest.mark.parametrize("op", FORMULA_OPS + [None])
def test_epilogue_equals_numpys_blocks_to_the_bit(op, shape, bias, residual, dtype, threads, monkeypatch):
    """fused.epilogue with the C pass against the plain NumPy blocks (the activation in C wherever
    NumPy's loops are found; else the bias and residual in C, the activation in NumPy), on maps,
    dense rows and 1x1 maps (a bias value an element)."""
    act = None if op is None else (op, _args(op))
    if not (bias or residual or act):
        pytest.skip("nothing to do: the epilogue returns y")
    seed = zlib.crc32(f"{op}{bias}{residual}{dtype.__name__}{shape}".encode())
    y0 = _values(shape, dtype, seed)
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
    whole = op is None or celementwise.renderable(OPS[op].formula.fwd, np.dtype(dtype).name)
    assert ran == [None, "all" if whole else "affine" if bias or residual else None]
    (out0, pre0), (out1, pre1) = results
    np.testing.assert_array_equal(out1, out0)
    assert (pre0 is None) == (pre1 is None) == ("input" not in fused._reads(act))
    if pre0 is not None:
        np.testing.assert_array_equal(pre1, pre0)


def test_every_formula_is_rendered_with_numpys_loops():
    """Every formula op's forward and derivative run in C, NumPy's SIMD functions through NumPy's own
    inner loops (erf through SciPy's, where SciPy is installed)."""
    for op in FORMULA_OPS:
        f = OPS[op].formula
        for dtype in ("float32", "float64"):
            if "erf" in f.forward + f.derivative and celementwise._ufunc("erf") is None:
                continue
            assert celementwise.renderable(f.fwd, dtype) and celementwise.has_gradient_loop(op, dtype), (op, dtype)
    for name in ("exp", "expm1", "log", "log1p", "sqrt", "tanh", "logaddexp"):
        assert celementwise.numpy_loop(name, "float32") is not None, name


def test_a_ufunc_struct_that_disagrees_is_not_read(monkeypatch):
    """The loop pointers are read from the ufunc's C struct only where it agrees with what the
    ufunc says of itself (here, read 8 bytes off): then tanh is not rendered, and the epilogue
    leaves the activation to NumPy, with NumPy's values."""
    monkeypatch.setenv("CNNC_JIT", "1")
    celementwise.numpy_loop.cache_clear()
    celementwise._kernel.cache_clear()
    monkeypatch.setattr(celementwise, "_HEAD_OFFSET", celementwise._HEAD_OFFSET + 8)
    try:
        assert celementwise.numpy_loop("tanh", "float32") is None
        assert not celementwise.renderable(OPS["tanh"].formula.fwd)
        y = _values((4, 3, 9, 9), np.float32, 5)
        b = np.arange(3, dtype=np.float32)
        want = np.tanh(y + b.reshape(1, 3, 1, 1))
        assert celementwise.epilogue(y, b, None, ("tanh", ()), y) == "affine"
        out, _ = fused.epilogue(_values((4, 3, 9, 9), np.float32, 5), b, None, ("tanh", ()))
        np.testing.assert_array_equal(out, want)
    finally:
        celementwise.numpy_loop.cache_clear()
        celementwise._kernel.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", FORMULA_OPS)
def test_forward_loop_equals_numpy_to_the_bit(op, dtype, threads, monkeypatch):
    """An element-wise op on its own: the C pass against NumPy's rendering, both split and not."""
    monkeypatch.setenv("CNNC_JIT", "1")
    x = _values((7, 5, 40, 41), dtype, zlib.crc32(f"fwd{op}{dtype.__name__}".encode()))
    args = _args(op)
    out = np.full(x.shape, 7.0, dtype)
    if not celementwise.forward(op, args, x, out):
        pytest.skip(f"{op}: not rendered here (erf without SciPy)")
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(out, ew.apply(op, args, x))


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
    y = np.ones((4, 8, 32, 32), np.float32)
    out = np.empty_like(y)
    bias = np.ones(8, np.float32)
    monkeypatch.setenv("CNNC_JIT", "1")
    assert celementwise.gradient("tanh", (), None, y, y, out) and celementwise.forward("tanh", (), y, out)
    assert celementwise.epilogue(y, bias, None, ("relu", ()), y) == "all"
    monkeypatch.setenv("CNNC_JIT", "0")
    assert not celementwise.gradient("tanh", (), None, y, y, out) and not celementwise.forward("tanh", (), y, out)
    assert celementwise.epilogue(y, bias, None, ("relu", ()), y) is None
    monkeypatch.setenv("CNNC_JIT", "1")
    monkeypatch.setattr(cc, "_broken", "the compiler failed")
    assert not celementwise.gradient("tanh", (), None, y, y, out) and not celementwise.forward("tanh", (), y, out)
    assert celementwise.epilogue(y, bias, None, ("relu", ()), y) is None


def test_small_arrays_stay_on_numpy(monkeypatch):
    """Under MIN_ELEMENTS a C call's Python costs more than NumPy's pass: forward declines (the
    gradient does not: its bits must be fused_bn's at every size)."""
    monkeypatch.setenv("CNNC_JIT", "1")
    y = np.ones((64, 84), np.float32)
    assert y.size < celementwise.MIN_ELEMENTS
    assert not celementwise.forward("tanh", (), y, np.empty_like(y))
    assert celementwise.gradient("leaky_relu", (0.2,), y, None, y, np.empty_like(y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(64, 6, 28, 28), (5, 3, 7, 3), (9, 120, 1, 1)], ids=["lenet-c1", "odd", "1x1"])
def test_channel_sums_are_the_bias_gradient_on_any_thread_count(shape, dtype, monkeypatch):
    """The bias gradient's sums: within rounding of float64 sums, and the same bits on one thread
    and on two (the order depends on the shape only)."""
    monkeypatch.setenv("CNNC_JIT", "1")
    dy = np.random.default_rng(3).normal(size=shape).astype(dtype)
    got = []
    for threads in (1, 2):
        monkeypatch.setattr(parallel, "_threads", threads)
        got.append(celementwise.channel_sums(dy))
    np.testing.assert_array_equal(got[0], got[1])
    want = dy.astype(np.float64).sum(axis=(0, 2, 3))
    assert got[0].dtype == dtype and got[0].shape == (shape[1],)
    np.testing.assert_allclose(got[0], want, rtol=1e-5 if dtype == np.float32 else 1e-13,
                               atol=1e-5 * np.abs(dy).sum(axis=(0, 2, 3)).max() if dtype == np.float32 else 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 96, 56, 56), (1, 1152, 7, 7), (3, 5, 4, 5), (2, 7, 3, 3)],
                         ids=["se-56", "se-7", "odd", "under-a-vector"])
def test_the_global_average_pool_sums_its_maps_in_c(shape, dtype, monkeypatch):
    """globalavgpool's forward: each map's sum in C ÷ its size, within rounding of float64's mean,
    the same on one thread and two; maps under a vector (9 values) take NumPy's mean."""
    from cnnc.backends.base import Ctx
    from cnnc.backends.numpy import conv
    monkeypatch.setenv("CNNC_JIT", "1")
    x = np.random.default_rng(4).normal(size=shape).astype(dtype)
    sums, real = [], celementwise.map_sums
    monkeypatch.setattr(celementwise, "map_sums", lambda a: sums.append(real(a)) or sums[-1])
    got = []
    for threads in (1, 2):
        monkeypatch.setattr(parallel, "_threads", threads)
        y, saved = conv.globalavgpool_forward(None, [x], {}, Ctx())
        got.append(y)
    np.testing.assert_array_equal(got[0], got[1])
    assert got[0].dtype == dtype and got[0].shape == (*shape[:2], 1, 1) and saved == shape
    assert all(v is None for v in sums) == (shape[2] * shape[3] < 16)
    want = x.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=(1e-6 if dtype == np.float32 else 1e-14))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 96, 56, 56), (4, 1152, 7, 7), (3, 5, 1, 1), (2, 7, 3, 5)],
                         ids=["se-56", "se-7", "1x1", "odd"])
def test_maps_scaled_by_their_gates_are_numpys_product(shape, dtype, threads, monkeypatch):
    """scale_maps (fused_mul's x · act(g)): NumPy's x * s to the bit, split or not; refused (None)
    for a gate that is not one value a map, a non-contiguous input, another dtype."""
    monkeypatch.setenv("CNNC_JIT", "1")
    rng = np.random.default_rng(6)
    x = _values(shape, dtype, 6)
    s = rng.normal(size=(*shape[:2], 1, 1)).astype(dtype)
    out = celementwise.scale_maps(x, s)
    assert out is not None and out.dtype == dtype
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(out, x * s)
    assert celementwise.scale_maps(x, s[:, :1]) is None
    assert celementwise.scale_maps(x, s.astype(np.float32 if dtype == np.float64 else np.float64)) is None
    if shape[-1] > 1:
        assert celementwise.scale_maps(x[..., ::2], s) is None


# ---- the fast forward: exp and sigmoid by the C pass's own polynomial (inference, float32) -------

FAST_OPS = [op for op in FORMULA_OPS if celementwise.fast_applies(op, "f")]


def _within_ulps(got, want, ulps: int) -> None:
    """Equal where not finite; else |got − want| ≤ ulps spacings of want (subnormals included)."""
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    err = np.abs(got[finite].astype(np.float64) - want[finite].astype(np.float64))
    bound = ulps * np.spacing(np.abs(want[finite])).astype(np.float64)
    assert (err <= bound).all(), (err / bound).max()


def test_the_fast_ops_are_the_ones_that_call_exp_or_sigmoid():
    assert set(FAST_OPS) == {"sigmoid", "silu"}
    assert not any(celementwise.fast_applies(op, "d") for op in FORMULA_OPS)  # float64 keeps NumPy's


def test_the_fast_sigmoid_is_within_two_ulps_of_float64s_over_its_whole_range(monkeypatch):
    """Every x from −110 to 110 in steps of 1/64 (and where e^−x overflows, underflows to
    subnormals and to 0), against 1 / (1 + e^−x) in float64 rounded to float32, e^−x infinite
    where it is beyond float32's range (as NumPy's float32 exp gives it: the sigmoid is then 0)."""
    monkeypatch.setenv("CNNC_JIT", "1")
    x = np.concatenate([np.arange(-110 * 64, 110 * 64 + 1) / 64, [-88.72, -87.34, 87.34, 88.72, 103.9]])
    x = x.astype(np.float32).reshape(1, 1, -1)
    out = np.empty_like(x)
    assert celementwise.epilogue(x.copy(), None, None, ("sigmoid", ()), out, fast=True) == "all"
    e = np.exp(-x.astype(np.float64))
    e[e > np.finfo(np.float32).max] = np.inf
    want = (1 / (1 + e)).astype(np.float32)
    _within_ulps(out, want, 2)


@pytest.mark.parametrize("bias,residual", [(True, False), (True, True), (False, False)],
                         ids=["bias", "both", "neither"])
@pytest.mark.parametrize("op", FAST_OPS)
def test_the_fast_epilogue_is_within_four_ulps_of_numpys(op, bias, residual, threads, monkeypatch):
    """The inference epilogue (fast) against the exact one (NumPy's bits), float32, with the
    special values: non-finite results equal, finite ones within 4 ulps; pre-activation equal."""
    monkeypatch.setenv("CNNC_JIT", "1")
    shape = (3, 5, 40, 41)
    y0 = _values(shape, np.float32, zlib.crc32(op.encode()))
    y0.reshape(-1)[10:16] = [88.0, -88.0, 89.0, -89.0, 104.0, -104.0]
    rng = np.random.default_rng(1)
    b = rng.normal(size=5).astype(np.float32) if bias else None
    r = rng.normal(size=shape).astype(np.float32) if residual else None
    act = (op, _args(op))
    with np.errstate(all="ignore"):
        exact, pre0 = fused.epilogue(y0.copy(), b, r, act)
        fast, pre1 = fused.epilogue(y0.copy(), b, r, act, fast=True)
    assert not np.array_equal(fast, exact, equal_nan=True)  # the fast pass ran
    _within_ulps(fast, exact, 4)
    assert (pre0 is None) == (pre1 is None)
    if pre0 is not None:
        np.testing.assert_array_equal(pre1, pre0)


def test_a_fast_float64_epilogue_is_numpys(monkeypatch):
    monkeypatch.setenv("CNNC_JIT", "1")
    y0 = _values((4, 5, 30, 31), np.float64, 3)
    with np.errstate(all="ignore"):
        exact, _ = fused.epilogue(y0.copy(), None, None, ("silu", ()))
        fast, _ = fused.epilogue(y0.copy(), None, None, ("silu", ()), fast=True)
    np.testing.assert_array_equal(fast, exact)


def test_a_fused_conv_is_fast_in_inference_and_numpys_in_training(monkeypatch):
    """fused_conv with silu: its training forward has NumPy's values (the fused training plan's
    gradients are the plain plan's), its inference forward the fast pass's, within a few ulps."""
    from cnnc.backends.base import Ctx
    from test_numpy_grad import make_node
    monkeypatch.setenv("CNNC_JIT", "1")
    monkeypatch.setenv("CNNC_AUTOTUNE", "off")
    node, _ = make_node("fused_conv", dict(filters=8, kernel=3, pad=1, activation="silu"), [(4, 12, 12)])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 12, 12)).astype(np.float32) * 3
    params = {"weight": rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32),
              "bias": rng.normal(0, 0.5, 8).astype(np.float32)}
    y_train, (_, pre, _) = fused.fused_conv_forward(node, [x], params, Ctx(training=True))
    y_infer, _ = fused.fused_conv_forward(node, [x], params, Ctx())
    np.testing.assert_array_equal(y_train, ew.apply("silu", (), pre))
    _within_ulps(y_infer, y_train, 4)
    assert not np.array_equal(y_infer, y_train)
