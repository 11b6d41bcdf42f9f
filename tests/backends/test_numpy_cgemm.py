"""Matrix products split over the C workers (backends/numpy/cgemm.py): equal to NumPy's within
rounding, split by columns or rows, on views with other leading dimensions, on one thread or
two; refused (False, nothing written) for what it does not take; off where OpenBLAS runs more
than one thread or CNNC_JIT is 0; and float64 finite differences of a batch-1 conv whose forward
runs through it."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends.numpy import NumpyBackend, blas, cc, cgemm, cthreads, parallel

pytestmark = pytest.mark.skipif(not cc.available(), reason="no C compiler (cc) on this machine")


@pytest.fixture(autouse=True)
def _backend():
    NumpyBackend()  # OpenBLAS single-threaded, as the backend runs it


# MobileNetV2's and ResNet-50's batch-1 gemms (1×1 and im2col), wide and tall, and tiny ones
SHAPES = [(96, 16, 12544), (24, 96, 3136), (256, 2304, 196), (512, 4608, 49), (1000, 64, 17), (7, 5, 3), (1, 9, 1)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_the_split_product_is_numpys_within_rounding(m, k, n, dtype, threads, monkeypatch):
    monkeypatch.setattr(parallel, "_threads", threads)
    rng = np.random.default_rng(m * k + n)
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    out = np.full((m, n), np.nan, dtype=dtype)
    shares = []
    run = cthreads.run
    monkeypatch.setattr(cthreads, "run", lambda fn, args, slices: (shares.append(slices), run(fn, args, slices)))
    assert cgemm.matmul(a, b, out)
    ref = a @ b
    eps = np.finfo(dtype).eps
    assert np.abs(out - ref).max() <= 8 * eps * k * np.abs(a).max() * np.abs(b).max()
    (slices,) = shares
    total = n if n >= m else m
    assert slices[0][0] == 0 and slices[-1][1] == total and all(s[1] == t[0] for s, t in zip(slices, slices[1:]))
    if threads == 1 or m * n * k < cthreads.MIN_WORK:
        assert len(slices) == 1
    else:
        assert len(slices) == 2


def test_views_with_their_own_leading_dimensions_and_the_output_in_place():
    rng = np.random.default_rng(0)
    big_a = rng.standard_normal((300, 200)).astype(np.float32)
    big_b = rng.standard_normal((150, 4000)).astype(np.float32)
    a, b = big_a[10:138, 5:105], big_b[20:120, 100:3100]  # (128, 100) by (100, 3000), strided rows
    big_out = np.zeros((140, 3100), dtype=np.float32)
    out = big_out[3:131, 50:3050]
    assert cgemm.matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-4)
    outside = big_out.copy()
    outside[3:131, 50:3050] = 0
    assert not outside.any()  # nothing written outside the view


@pytest.mark.parametrize("case", ["transposed a", "transposed b", "ints", "mixed dtypes", "shapes", "empty"])
def test_what_it_does_not_take_is_left_to_numpy(case):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 30)).astype(np.float32), rng.standard_normal((30, 50)).astype(np.float32)
    out = np.zeros((40, 50), dtype=np.float32)
    if case == "transposed a":
        a = np.ascontiguousarray(a.T).T
    elif case == "transposed b":
        b = np.ascontiguousarray(b.T).T
    elif case == "ints":
        a, b, out = a.astype(np.int32), b.astype(np.int32), out.astype(np.int32)
    elif case == "mixed dtypes":
        b = b.astype(np.float64)
    elif case == "shapes":
        b = b[:20]
    else:
        a, out = a[:0], out[:0]
    assert not cgemm.matmul(a, b, out)
    assert not out.any()


def test_off_where_openblas_has_threads_of_its_own_or_the_compiled_kernels_are_off(monkeypatch):
    with blas.threads(1):
        if blas.get_threads() != 1:
            pytest.skip("NumPy's BLAS is not an OpenBLAS whose thread count can be set")
        assert cgemm.available()
    with blas.threads(2):  # each share would start OpenBLAS's threads
        assert not cgemm.available()
    monkeypatch.setenv("CNNC_JIT", "0")
    assert not cgemm.available()
    a = np.ones((64, 64), dtype=np.float32)
    assert not cgemm.matmul(a, a, np.empty_like(a))


@pytest.mark.parametrize("kw,shape", [
    # im2col's columns by the filters (72 > DIRECT_MAX_CHANNELS: not the direct conv's)
    (dict(filters=72, kernel=3, pad=1), (32, 24, 24)),
    (dict(filters=256, kernel=1), (256, 14, 14)),  # a 1×1 conv: the input is its own columns
], ids=["3x3", "1x1"])
def test_a_batch_1_conv_through_the_split_gemm_matches_finite_differences(kw, shape, two_threads, monkeypatch):
    """float64, batch 1, the gemm-based conv (the split gemm in its forward): the analytic gradients
    of sum(y · R) against central differences of the forward along random directions."""
    from cnnc.backends.base import Ctx
    from cnnc.backends.numpy import conv
    from test_numpy_grad import make_node
    monkeypatch.setenv("CNNC_AUTOTUNE", "off")
    monkeypatch.setattr(conv, "SHIFTED_MAX_GRID", 0.0)  # im2col, not the shifted windows
    node, _ = make_node("conv", kw, [shape])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, *shape))
    params = {"weight": rng.normal(0, 0.1, (kw["filters"], shape[0], kw["kernel"], kw["kernel"])),
              "bias": rng.normal(0, 0.1, kw["filters"])}
    calls = []
    split = cgemm.matmul
    monkeypatch.setattr(cgemm, "matmul", lambda a, b, out, after=None: calls.append(a.dtype) or split(a, b, out, after))
    ctx = Ctx(training=True)
    y, saved = conv.conv_forward(node, [x], params, ctx)
    assert calls and calls[0] == np.float64  # the split gemm computed it
    r = rng.standard_normal(y.shape)
    (dx,), dparams = conv.conv_backward(node, saved, r, params, ctx)

    def loss(x_, weight):
        return float(np.sum(conv.conv_forward(node, [x_], {**params, "weight": weight}, ctx)[0] * r))

    h = 1e-6
    for _ in range(3):
        v, u = rng.standard_normal(x.shape), rng.standard_normal(params["weight"].shape)
        numeric = (loss(x + h * v, params["weight"] + h * u) - loss(x - h * v, params["weight"] - h * u)) / (2 * h)
        analytic = float(np.sum(dx * v) + np.sum(dparams["weight"] * u))
        assert abs(numeric - analytic) <= 1e-7 * max(abs(analytic), 1.0), (numeric, analytic)


# ---- an epilogue run by the shares, block by block (fused_conv at batch 1) ----------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(96, 16, 12544), (24, 96, 3136), (384, 64, 196), (1000, 64, 17)],
                         ids=["columns", "columns-narrow", "rows", "rows-tiny"])
def test_an_epilogue_after_each_block_covers_every_element_once(m, k, n, dtype, threads, monkeypatch):
    """A bias added after each block (twice on an element, or not at all, would show): out = a @ b
    + bias within the product's rounding; the bias's addition itself is exact in its order."""
    from cnnc.backends.numpy import celementwise
    monkeypatch.setattr(parallel, "_threads", threads)
    monkeypatch.setattr(cgemm, "AFTER_BLOCK_BYTES", 4096)  # many blocks a share
    monkeypatch.setattr(cgemm, "AFTER_MIN_COLUMNS", 48)
    rng = np.random.default_rng(m + k + n)
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    bias = rng.standard_normal(m).astype(dtype)
    out = np.full((m, n), np.nan, dtype=dtype)
    y = out.reshape(1, m, n)  # a conv's output at batch 1: the rows are its channels
    then = celementwise.deferred_epilogue(y, bias, None, None, y)
    assert then is not None
    assert cgemm.matmul(a, b, out, (then.task, then.args))
    ref = a @ b + bias[:, None]
    eps = np.finfo(dtype).eps
    assert np.abs(out - ref).max() <= 8 * eps * k * np.abs(a).max() * np.abs(b).max() + 4 * eps * np.abs(bias).max()


def test_an_epilogue_needs_a_contiguous_output():
    from cnnc.backends.numpy import celementwise
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((32, 8)).astype(np.float32), rng.standard_normal((8, 100)).astype(np.float32)
    big = np.zeros((32, 128), np.float32)
    then = celementwise.deferred_epilogue(big.reshape(1, 32, 128), np.ones(32, np.float32), None, None,
                                          big.reshape(1, 32, 128))
    assert not cgemm.matmul(a, b, big[:, :100], (then.task, then.args))
    assert not big.any()


ACTS = [None, ("relu6", ()), ("silu", ()), ("leaky_relu", (0.1,))]


@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a[0] if a else "none")
@pytest.mark.parametrize("shape,filters", [((16, 56, 56), 96), ((64, 14, 14), 384)], ids=["columns", "rows"])
def test_a_batch_1_fused_conv_with_its_epilogue_in_the_gemm_equals_the_separate_pass(shape, filters, act, residual,
                                                                                     two_threads, monkeypatch):
    """fused_conv at batch 1: the split gemm runs the epilogue after each block; against the conv
    followed by the epilogue's own pass, within the gemm's rounding (the blocks are smaller
    products, which OpenBLAS may sum in another order), the kept pre-activation too."""
    from cnnc.backends.base import Ctx
    from cnnc.backends.numpy import conv, fused
    from test_numpy_grad import make_node
    monkeypatch.setenv("CNNC_AUTOTUNE", "off")
    attrs = dict(filters=filters, kernel=1, activation=act[0] if act else "none", residual=residual)
    if act and act[1]:
        attrs["act_args"] = act[1]
    node, _ = make_node("fused_conv", attrs, [shape] + ([(filters, *shape[1:])] if residual else []))
    rng = np.random.default_rng(filters)
    x = rng.standard_normal((1, *shape)).astype(np.float32)
    xs = [x] + ([rng.standard_normal((1, filters, *shape[1:])).astype(np.float32)] if residual else [])
    params = {"weight": rng.normal(0, 0.2, (filters, shape[0], 1, 1)).astype(np.float32),
              "bias": rng.normal(0, 0.2, filters).astype(np.float32)}
    results = {}
    deferred = conv.ConvEpilogue.deferred
    for way in ("in the gemm", "separate"):
        ran = []
        if way == "separate":
            monkeypatch.setattr(conv.ConvEpilogue, "deferred", lambda self, y: None)
        else:
            monkeypatch.setattr(conv.ConvEpilogue, "done", lambda self: ran.append(1) or setattr(self, "result",
                                                                                               self._pending))
        y, (_, pre, _) = fused.fused_conv_forward(node, xs, params, Ctx())
        assert ran == ([1] if way == "in the gemm" else [])
        results[way] = (y.copy(), None if pre is None else pre.copy())
        monkeypatch.setattr(conv.ConvEpilogue, "deferred", deferred)
    (y1, pre1), (y0, pre0) = results["in the gemm"], results["separate"]
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    assert (pre1 is None) == (pre0 is None)
    if pre0 is not None:
        np.testing.assert_allclose(pre1, pre0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,filters", [((16, 56, 56), 96), ((64, 14, 14), 384)], ids=["columns", "rows"])
def test_a_batch_1_plain_conv_has_its_bias_added_in_the_gemm_as_numpy_adds_it(shape, filters, two_threads,
                                                                             monkeypatch):
    """A plain conv with a bias at batch 1 (a projection without activation): the split gemm adds
    the bias block by block, the values within the gemm's rounding of the conv without it plus
    NumPy's bias, and it says it ran; where the kernel cannot take it, NumPy adds it."""
    from cnnc.backends.base import Ctx
    from cnnc.backends.numpy import conv
    from test_numpy_grad import make_node
    monkeypatch.setenv("CNNC_AUTOTUNE", "off")
    node, _ = make_node("conv", dict(filters=filters, kernel=1), [shape])
    rng = np.random.default_rng(filters)
    x = rng.standard_normal((1, *shape)).astype(np.float32)
    params = {"weight": rng.normal(0, 0.2, (filters, shape[0], 1, 1)).astype(np.float32),
              "bias": rng.normal(0, 0.2, filters).astype(np.float32)}
    ran = []
    real_done = conv.ConvEpilogue.done
    monkeypatch.setattr(conv.ConvEpilogue, "done", lambda self: ran.append(1) or real_done(self))
    y, _ = conv.conv_forward(node, [x], params, Ctx())
    assert ran == [1]
    plain, _ = conv.conv_forward(node, [x], {"weight": params["weight"]}, Ctx())
    np.testing.assert_allclose(y, plain + params["bias"].reshape(1, -1, 1, 1), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(conv.ConvEpilogue, "deferred", lambda self, y: None)
    separate, _ = conv.conv_forward(node, [x], params, Ctx())
    assert ran == [1]
    np.testing.assert_allclose(y, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [("silu", ()), ("relu", ())], ids=["silu", "relu"])
def test_a_batch_1_fused_conv_with_its_epilogue_in_the_gemm_matches_finite_differences(act, two_threads, monkeypatch):
    """float64, batch 1, fused_conv (bias, residual, activation) whose epilogue the split gemm ran:
    the analytic gradients of sum(y · R) against central differences along random directions."""
    from cnnc.backends.base import Ctx
    from cnnc.backends.numpy import conv, fused
    from test_numpy_grad import make_node
    monkeypatch.setenv("CNNC_AUTOTUNE", "off")
    shape, filters = (32, 32, 32), 128  # 4.2M multiply-adds: the filters split (parallel.MIN_WORK)
    node, _ = make_node("fused_conv", dict(filters=filters, kernel=1, activation=act[0], residual=True),
                        [shape, (filters, *shape[1:])])
    rng = np.random.default_rng(7)
    x, res = rng.standard_normal((1, *shape)), rng.standard_normal((1, filters, *shape[1:]))
    params = {"weight": rng.normal(0, 0.2, (filters, shape[0], 1, 1)), "bias": rng.normal(0, 0.2, filters)}
    done = []
    real_done = conv.ConvEpilogue.done
    monkeypatch.setattr(conv.ConvEpilogue, "done", lambda self: done.append(1) or real_done(self))
    ctx = Ctx(training=True)
    y, saved = fused.fused_conv_forward(node, [x, res], params, ctx)
    assert done and y.dtype == np.float64  # the gemm ran the epilogue
    r = rng.standard_normal(y.shape)
    (dx, dres), dparams = fused.fused_conv_backward(node, saved, r, params, ctx)

    def loss(x_, res_, weight, bias):
        out, _ = fused.fused_conv_forward(node, [x_, res_], {"weight": weight, "bias": bias}, ctx)
        return float(np.sum(out * r))

    h = 1e-6
    for _ in range(3):
        v, s = rng.standard_normal(x.shape), rng.standard_normal(res.shape)
        u, t = rng.standard_normal(params["weight"].shape), rng.standard_normal(filters)
        numeric = (loss(x + h * v, res + h * s, params["weight"] + h * u, params["bias"] + h * t)
                   - loss(x - h * v, res - h * s, params["weight"] - h * u, params["bias"] - h * t)) / (2 * h)
        analytic = float(np.sum(dx * v) + np.sum(dres * s) + np.sum(dparams["weight"] * u)
                         + np.sum(dparams["bias"] * t))
        assert abs(numeric - analytic) <= 1e-7 * max(abs(analytic), 1.0), (numeric, analytic)
