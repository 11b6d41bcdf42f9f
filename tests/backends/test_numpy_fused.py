"""The NumPy backend's fused kernels against the composition of the unfused ones.

fused_conv = conv → (add residual) → activation, fused_dense = dense → activation,
fused_bn = batchnorm → activation (equal to the bit, compiled and plain; finite differences),
elemwise_chain = its unary ops in order, fused_mul = activation of the C×1×1 gate → mul, each checked forward and backward (input, residual
and parameter gradients) against the unfused kernels of `KERNELS` with the corresponding
plain attributes, in float32 (1e-6 relative) and float64 (1e-12); finite differences in
float64 for the fused conv with a residual, for chains and for fused_mul; layout_transform's round trip and
gradient. Also: inputs and dy are never written, float32 stays float32, and blocked and
threaded epilogues give the single-block results.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from test_numpy_grad import _numeric, make_node, make_params, rel

from cnnc.backends.base import Ctx
from cnnc.backends.numpy import NumpyBackend, elementwise, fused, parallel
from cnnc.backends.numpy.kernels import ELEMENTWISE as FORMULA_KERNEL, KERNELS
from cnnc.compiler.ops import OPS

BATCH = 2
TOL = {np.float32: 1e-6, np.float64: 1e-12}
ELEMENTWISE = [op for op in OPS if OPS[op].formula is not None]  # every activation the table has
ACTS = ["none"] + ELEMENTWISE
# values tried for formula parameters by name; leaky_relu's slope: the usual, zero, negative
# (the output hides the input's sign), above one. Others try their default.
PARAM_VALUES = {"slope": [0.2, 0.0, -0.3, 1.5], "alpha": [1.0, 0.4]}
BACKEND = NumpyBackend()


def kernel(op):
    """The backend's kernel for an op (element-wise ops: its formula kernel)."""
    return BACKEND.kernel(op)


def param_cases(op) -> list[tuple[float, ...]]:
    params = OPS[op].formula.params if op != "none" else ()
    if not params:
        return [()]
    (name,) = params
    return [(v,) for v in PARAM_VALUES.get(name, [OPS[op].attrs.model_fields[name].default])]


def act_attrs(act: str, args) -> dict:
    """The unfused op's attributes for formula arguments `args`."""
    return dict(zip(OPS[act].formula.params, args))


def epilogue_attrs(act: str, args) -> dict:
    return dict(activation=act, act_args=tuple(args))


def seed(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def close(got, want, dtype, what=""):
    tol = TOL[dtype]
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, what
    err = rel(got, want)
    assert err <= tol, f"{what}: relative error {err:.2e}"
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(scale, 1e-30), err_msg=what)


def act_nodes(act: str, args, shape):
    """The unfused activation's node, or None for `none`."""
    if act == "none":
        return None
    return make_node(act, act_attrs(act, args), [shape])[0]


def act_cases():
    return [(a, args) for a in ACTS for args in param_cases(a)]


def act_id(c) -> str:
    return c[0] + "".join(f"{v:g}" for v in c[1])


# ---- fused_conv ------------------------------------------------------------------------------

CONVS = {  # each takes a different path through conv.py (dx: transposed conv, col2im, pointwise)
    "3x3-pad1": (dict(filters=4, kernel=3, pad=1), (3, 6, 6)),
    "3x3-s2-asym-floor": (dict(filters=4, kernel=3, stride=2, pad=(1, 0, 2, 1), round="floor"), (3, 8, 8)),
    "dilation2": (dict(filters=3, kernel=3, dilation=2, pad=2), (2, 7, 7)),
    "groups2": (dict(filters=6, kernel=3, groups=2, pad=1), (4, 5, 5)),
    "depthwise-s2": (dict(filters=4, kernel=3, groups=4, pad=1, stride=2), (4, 7, 7)),
    "1x1": (dict(filters=5, kernel=1), (3, 5, 5)),
    "1x1-s2": (dict(filters=4, kernel=1, stride=2, round="floor"), (3, 6, 6)),
    "1x3-same": (dict(filters=4, kernel=(1, 3), pad="same"), (3, 5, 6)),
}


def conv_reference(kw, xshape, act, slope, residual, x, r, params, dy):
    """conv → add → activation with the unfused kernels: y and (dx, dr, dparams)."""
    ctx = Ctx()
    conv, _ = make_node("conv", kw, [xshape])
    y, s_conv = KERNELS["conv"].forward(conv, [x], params, ctx)
    if residual:
        add, _ = make_node("add", {}, [conv.out_shape, conv.out_shape])
        y, s_add = KERNELS["add"].forward(add, [y, r], {}, ctx)
    anode = act_nodes(act, slope, conv.out_shape)
    if anode is not None:
        y, s_act = kernel(act).forward(anode, [y], {}, ctx)
        (dy,), _ = kernel(act).backward(anode, s_act, dy, {}, ctx)
    dr = None
    if residual:
        (dy, dr), _ = KERNELS["add"].backward(add, s_add, dy, {}, ctx)
    (dx,), dps = KERNELS["conv"].backward(conv, s_conv, dy, params, ctx)
    return y, dx, dr, dps


def conv_inputs(node, specs, dtype, rng, scale=2.0):
    x = (rng.normal(0, scale, (BATCH, *node.in_shapes[0]))).astype(dtype)
    r = (rng.normal(0, scale, (BATCH, *node.out_shape))).astype(dtype) if node.attrs.residual else None
    params = make_params(specs, rng, dtype)
    dy = rng.normal(size=(BATCH, *node.out_shape)).astype(dtype)
    return x, r, params, dy


def run_fused(node, xs, params, dy):
    k = FORMULA_KERNEL if OPS[node.op].formula is not None else KERNELS[node.op]
    originals = [a.copy() for a in [*xs, dy, *params.values()]]
    y, saved = k.forward(node, xs, params, Ctx())
    dxs, dps = k.backward(node, saved, dy, params, Ctx())
    for a, o in zip([*xs, dy, *params.values()], originals):
        np.testing.assert_array_equal(a, o)  # inputs, dy and parameters are never written
    return y, dxs, dps


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", act_cases(), ids=act_id)
@pytest.mark.parametrize("conv", list(CONVS))
def test_fused_conv_matches_unfused(conv, act, bias, residual):
    kw, xshape = CONVS[conv]
    kw = {**kw, "bias": bias}
    act, slope = act
    out = OPS["conv"].shape(OPS["conv"].attrs(**kw), [xshape])
    node, specs = make_node("fused_conv", dict(kw, **epilogue_attrs(act, slope), residual=residual),
                            [xshape, out] if residual else [xshape])
    assert [s.name for s in specs] == (["weight", "bias"] if bias else ["weight"])
    for dtype in (np.float32, np.float64):
        rng = seed(conv, act, slope, bias, residual, dtype.__name__)
        x, r, params, dy = conv_inputs(node, specs, dtype, rng)
        y, dxs, dps = run_fused(node, [x, r] if residual else [x], params, dy)
        y0, dx0, dr0, dps0 = conv_reference(kw, xshape, act, slope, residual, x, r, params, dy)
        close(y, y0, dtype, "y")
        assert len(dxs) == (2 if residual else 1)
        close(dxs[0], dx0, dtype, "dx")
        if residual:
            close(dxs[1], dr0, dtype, "d residual")
        assert sorted(dps) == sorted(dps0)
        for name in dps0:
            close(dps[name], dps0[name], dtype, f"d {name}")


def fd_check(node, leaves_in, params, rng):
    """Analytic gradients of sum(y·R) against central differences, float64."""
    k = KERNELS[node.op]
    y, saved = k.forward(node, leaves_in, params, Ctx())
    rr = rng.normal(size=y.shape)
    dxs, dps = k.backward(node, saved, rr.copy(), params, Ctx())

    def loss():
        return float(np.sum(k.forward(node, leaves_in, params, Ctx())[0] * rr))

    for i, (leaf, dx) in enumerate(zip(leaves_in, dxs)):
        err = rel(dx, _numeric(loss, leaf, 1e-6))
        assert err <= 1e-6, f"input {i}: relative error {err:.2e}"
    for name in params:
        err = rel(dps[name], _numeric(loss, params[name], 1e-6))
        assert err <= 1e-6, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("act,slope", [("relu6", ()), ("leaky_relu", (0.1,)), ("leaky_relu", (-0.4,))]
                         + [(op, param_cases(op)[0]) for op in ELEMENTWISE if op not in ("relu6", "leaky_relu")])
def test_fused_conv_residual_finite_differences(act, slope):
    kw = dict(filters=4, kernel=3, pad=1, stride=2, round="floor", **epilogue_attrs(act, slope), residual=True)
    node, specs = make_node("fused_conv", kw, [(3, 7, 7), (4, 4, 4)])
    rng = seed("fd", act, slope)
    x, r, params, _ = conv_inputs(node, specs, np.float64, rng, scale=3.0)
    if act == "relu6":
        y, _ = KERNELS["fused_conv"].forward(node, [x, r], params, Ctx())
        assert (y == 6).any() and (y == 0).any() and ((y > 0) & (y < 6)).any()  # both kinks are crossed
    fd_check(node, [x, r], params, rng)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("act", ["relu", "silu", "none"])
@pytest.mark.parametrize("kernel,stride,pad", [(1, 1, 0), (1, 2, 0), (3, 1, 1)], ids=["1x1", "1x1s2", "3x3"])
def test_a_batch_fused_conv_runs_its_epilogue_image_by_image_to_the_bit_of_the_separate_pass(
        kernel, stride, pad, act, training, two_threads, monkeypatch):
    """More images than threads (im2col, the images shared out): each thread runs the epilogue
    (bias, residual, activation) on each of its images right after that image's gemm, in the same
    C pass the separate epilogue runs over the batch: the output and the kept pre-activation are
    the separate pass's to the bit, and so are the gradients."""
    from cnnc.backends.numpy import conv
    monkeypatch.setattr(conv, "_algorithm", lambda *a: "im2col")
    kw = dict(filters=96, kernel=kernel, stride=stride, pad=pad, round="floor", bias=True)
    out = OPS["conv"].shape(OPS["conv"].attrs(**kw), [(48, 14, 14)])
    node, specs = make_node("fused_conv", dict(kw, **epilogue_attrs(act, ()), residual=True), [(48, 14, 14), out])
    rng = seed("image by image", kernel, stride, act)
    x = rng.normal(0, 2, (7, 48, 14, 14)).astype(np.float32)  # 7 images: two uneven shares
    r = rng.normal(0, 2, (7, *out)).astype(np.float32)
    params = make_params(specs, rng, np.float32)
    dy = rng.normal(size=(7, *out)).astype(np.float32)
    ctx = Ctx(training=training)
    results = {}
    deferred = conv.ConvEpilogue.deferred
    for way in ("image by image", "separate"):
        ran = []
        done = conv.ConvEpilogue.done
        monkeypatch.setattr(conv.ConvEpilogue, "done", lambda self: ran.append(1) or done(self))
        if way == "separate":
            monkeypatch.setattr(conv.ConvEpilogue, "deferred", lambda self, y: None)
        y, saved = KERNELS["fused_conv"].forward(node, [x, r], params, ctx)
        assert ran == ([1] if way == "image by image" else [])
        grads = KERNELS["fused_conv"].backward(node, saved, dy, params, ctx)
        results[way] = (y, saved[1], grads)
        monkeypatch.setattr(conv.ConvEpilogue, "deferred", deferred)
        monkeypatch.setattr(conv.ConvEpilogue, "done", done)
    (y1, pre1, (dxs1, dps1)), (y0, pre0, (dxs0, dps0)) = results["image by image"], results["separate"]
    np.testing.assert_array_equal(y1, y0)
    assert (pre1 is None) == (pre0 is None)
    if pre0 is not None:
        np.testing.assert_array_equal(pre1, pre0)
    for a, b in zip(dxs1, dxs0):
        np.testing.assert_array_equal(a, b)
    for name in dps0:
        np.testing.assert_array_equal(dps1[name], dps0[name])


# ---- fused_dense -----------------------------------------------------------------------------

@pytest.mark.parametrize("xshape", [(6,), (5, 1, 1)], ids=["flat", "c11"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", act_cases(), ids=act_id)
def test_fused_dense_matches_unfused(act, bias, xshape):
    act, slope = act
    node, specs = make_node("fused_dense", dict(units=4, bias=bias, **epilogue_attrs(act, slope)), [xshape])
    dense, _ = make_node("dense", dict(units=4, bias=bias), [xshape])
    anode = act_nodes(act, slope, dense.out_shape)
    for dtype in (np.float32, np.float64):
        rng = seed("dense", act, slope, bias, xshape, dtype.__name__)
        x = rng.normal(0, 3, (BATCH + 3, *xshape)).astype(dtype)
        params = make_params(specs, rng, dtype)
        dy = rng.normal(size=(BATCH + 3, 4)).astype(dtype)
        y, (dx,), dps = run_fused(node, [x], params, dy)
        y0, s0 = KERNELS["dense"].forward(dense, [x], params, Ctx())
        d0 = dy
        if anode is not None:
            y0, sa = kernel(act).forward(anode, [y0], {}, Ctx())
            (d0,), _ = kernel(act).backward(anode, sa, dy, {}, Ctx())
        (dx0,), dps0 = KERNELS["dense"].backward(dense, s0, d0, params, Ctx())
        close(y, y0, dtype, "y")
        close(dx, dx0, dtype, "dx")
        assert sorted(dps) == sorted(dps0)
        for name in dps0:
            close(dps[name], dps0[name], dtype, f"d {name}")


def test_fused_dense_finite_differences():
    node, specs = make_node("fused_dense", dict(units=3, activation="tanh"), [(5,)])
    rng = seed("dense-fd")
    params = make_params(specs, rng, np.float64)
    fd_check(node, [rng.normal(size=(BATCH, 5))], params, rng)


# ---- elemwise_chain --------------------------------------------------------------------------

CHAINS = [
    (("relu",), ((),)),
    (("relu6",), ((),)),
    (("leaky_relu",), ((0.2,),)),
    (("sigmoid",), ((),)),
    (("tanh",), ((),)),
    (("leaky_relu", "relu6"), ((-0.5,), ())),
    (("tanh", "relu"), ((), ())),
    (("sigmoid", "tanh", "leaky_relu"), ((), (), (1.5,))),
    (("leaky_relu", "sigmoid", "relu6", "tanh", "relu", "leaky_relu"), ((0.1,), (), (), (), (), (-0.3,))),
    (("relu6", "leaky_relu", "leaky_relu", "sigmoid"), ((), (0.3,), (0.0,), ())),
] + [((op, "tanh", op), (param_cases(op)[0], (), param_cases(op)[-1])) for op in ELEMENTWISE]


def chain_id(c) -> str:
    return "-".join(c[0])


def chain_reference(ops, slopes, shape, x, dy):
    saved, nodes = [], []
    y = x
    for op, s in zip(ops, slopes):
        n = act_nodes(op, s, shape)
        y, sv = kernel(op).forward(n, [y], {}, Ctx())
        nodes.append(n)
        saved.append(sv)
    g = dy
    for op, n, sv in reversed(list(zip(ops, nodes, saved))):
        (g,), _ = kernel(op).backward(n, sv, g, {}, Ctx())
    return y, g


@pytest.mark.parametrize("chain", CHAINS, ids=chain_id)
def test_chain_matches_unfused(chain):
    ops, slopes = chain
    shape = (3, 5, 4)
    node, specs = make_node("elemwise_chain", dict(ops=ops, args=slopes), [shape])
    assert node.out_shape == shape and specs == []
    for dtype in (np.float32, np.float64):
        rng = seed("chain", ops, dtype.__name__)
        x = rng.normal(0, 4, (BATCH, *shape)).astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        y, (dx,), dps = run_fused(node, [x], {}, dy)
        y0, dx0 = chain_reference(ops, slopes, shape, x, dy)
        assert dps == {}
        close(y, y0, dtype, "y")
        close(dx, dx0, dtype, "dx")


@pytest.mark.parametrize("chain", [CHAINS[8], CHAINS[9], CHAINS[5]] + CHAINS[10:], ids=chain_id)
def test_chain_finite_differences(chain):
    ops, slopes = chain
    node, _ = make_node("elemwise_chain", dict(ops=ops, args=slopes), [(3, 4, 4)])
    rng = seed("chain-fd", ops)
    x = rng.normal(0, 4, (BATCH, 3, 4, 4))
    x[np.abs(x) < 1e-3] += 0.01  # no input on relu's kink
    x[np.abs(x - 6) < 1e-3] += 0.01
    fd_check(node, [x], {}, rng)


def test_chain_on_a_strided_input_and_flat_features():
    node, _ = make_node("elemwise_chain", dict(ops=("tanh", "relu")), [(4, 3, 5)])
    rng = seed("strided")
    base = rng.normal(size=(BATCH, 5, 3, 4))
    x = base.transpose(0, 3, 2, 1)  # a non-contiguous view
    y, saved = KERNELS["elemwise_chain"].forward(node, [x], {}, Ctx())
    np.testing.assert_array_equal(y, np.maximum(np.tanh(x), 0))
    (dx,), _ = KERNELS["elemwise_chain"].backward(node, saved, np.ones_like(y), {}, Ctx())
    np.testing.assert_allclose(dx, (1 - np.tanh(x) ** 2) * (x > 0), rtol=1e-12)
    flat, _ = make_node("elemwise_chain", dict(ops=("sigmoid",)), [(7,)])
    y, _ = KERNELS["elemwise_chain"].forward(flat, [rng.normal(size=(3, 7)).astype(np.float32)], {}, Ctx())
    assert y.shape == (3, 7) and y.dtype == np.float32


# ---- layout_transform ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 300, 4, 5), (2, 20, 17, 16), (1, 3, 20, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layout_transform_round_trip_and_gradient(shape, dtype):
    rng = seed("layout", shape)
    n, c, h, w = shape
    to_nhwc, _ = make_node("layout_transform", dict(to="NHWC"), [(c, h, w)])
    to_nchw, _ = make_node("layout_transform", dict(to="NCHW"), [(c, h, w)])
    assert to_nhwc.out_shape == (c, h, w)  # the logical shape stays C×H×W
    k = KERNELS["layout_transform"]
    x = rng.normal(size=shape).astype(dtype)
    y, saved = k.forward(to_nhwc, [x], {}, Ctx())
    assert y.shape == (n, h, w, c) and y.flags.c_contiguous and y.dtype == dtype
    np.testing.assert_array_equal(y, x.transpose(0, 2, 3, 1))
    back, saved2 = k.forward(to_nchw, [y], {}, Ctx())
    assert back.shape == shape and back.flags.c_contiguous
    np.testing.assert_array_equal(back, x)
    # gradients: the transposes back, so <layout(x), dy> = <x, dx> (the adjoint)
    dy = rng.normal(size=y.shape).astype(dtype)
    (dx,), dps = k.backward(to_nhwc, saved, dy, {}, Ctx())
    assert dps == {} and dx.shape == shape and dx.flags.c_contiguous
    np.testing.assert_array_equal(dx, dy.transpose(0, 3, 1, 2))
    assert np.isclose(np.sum(y * dy), np.sum(x * dx), rtol=1e-5)
    (dy2,), _ = k.backward(to_nchw, saved2, dx, {}, Ctx())
    np.testing.assert_array_equal(dy2, dy)
    # a non-contiguous input (here already in NHWC order in memory) gives the same result
    view = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(k.forward(to_nhwc, [view], {}, Ctx())[0], y)


# ---- blocking, threads, dtypes, registration --------------------------------------------------

def _all_results(cases):
    out = []
    for node, xs, params, dy in cases:
        y, dxs, dps = run_fused(node, xs, params, dy)
        out.append([y, *dxs, *(dps[k] for k in sorted(dps))])
    return out


def _block_cases():
    rng = seed("blocks")
    cases = []
    for act, slope in [("relu", ()), ("leaky_relu", (-0.2,)), ("leaky_relu", (0.2,)), ("sigmoid", ()),
                       ("relu6", ()), ("hardswish", ()), ("gelu", ())]:
        node, specs = make_node("fused_conv", dict(filters=5, kernel=3, pad=1, **epilogue_attrs(act, slope),
                                                   residual=True), [(3, 6, 7), (5, 6, 7)])
        x, r, params, dy = conv_inputs(node, specs, np.float64, rng, scale=3.0)
        cases.append((node, [x, r], params, dy))
    node, specs = make_node("fused_dense", dict(units=6, activation="relu6"), [(5,)])
    params = make_params(specs, rng, np.float64)
    cases.append((node, [rng.normal(0, 4, (7, 5))], params, rng.normal(size=(7, 6))))
    ops, slopes = CHAINS[8]
    node, _ = make_node("elemwise_chain", dict(ops=ops, args=slopes), [(3, 7, 5)])
    cases.append((node, [rng.normal(0, 4, (BATCH, 3, 7, 5))], {}, rng.normal(size=(BATCH, 3, 7, 5))))
    for op in ("silu", "relu", "gelu_tanh"):  # a formula on its own, block by block past 4 blocks
        node, _ = make_node(op, {}, [(3, 7, 5)])
        cases.append((node, [rng.normal(0, 3, (BATCH, 3, 7, 5))], {}, rng.normal(size=(BATCH, 3, 7, 5))))
    node, _ = make_node("layout_transform", dict(to="NCHW"), [(20, 3, 4)])
    cases.append((node, [rng.normal(size=(3, 3, 4, 20))], {}, rng.normal(size=(3, 20, 3, 4))))
    return cases


@pytest.mark.parametrize("block,threads", [(37, 1), (1, 2), (64, 3)])
def test_blocked_and_threaded_epilogues_agree(block, threads, monkeypatch):
    """Small blocks (rows split across blocks, partial blocks) and worker threads give the
    one-block, one-thread results."""
    cases = _block_cases()
    expect = _all_results(cases)
    before = parallel.get_threads()
    monkeypatch.setattr(parallel, "BLOCK", block)
    monkeypatch.setattr(elementwise, "FORMULA_BLOCK", block)
    monkeypatch.setattr(fused, "_TILE_ROWS", 2)
    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    try:
        parallel.set_threads(threads)
        got = _all_results(cases)
    finally:
        parallel.set_threads(before)
    for case_got, case_expect in zip(got, expect):
        for a, b in zip(case_got, case_expect):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_and_outputs_are_fresh():
    rng = seed("f32")
    node, specs = make_node("fused_conv", dict(filters=4, kernel=1, activation="relu", residual=True),
                            [(3, 4, 4), (4, 4, 4)])
    x, r, params, dy = conv_inputs(node, specs, np.float32, rng)
    y, saved = KERNELS["fused_conv"].forward(node, [x, r], params, Ctx())
    assert y.dtype == np.float32 and y is not r and not np.shares_memory(y, r) and not np.shares_memory(y, x)
    dxs, dps = KERNELS["fused_conv"].backward(node, saved, dy, params, Ctx())
    assert all(a.dtype == np.float32 for a in [*dxs, *dps.values()])
    # no activation: the residual's gradient may be dy itself, never an array the kernel keeps
    node, specs = make_node("fused_conv", dict(filters=4, kernel=1, residual=True), [(3, 4, 4), (4, 4, 4)])
    y, saved = KERNELS["fused_conv"].forward(node, [x, r], params, Ctx())
    (dx, dr), _ = KERNELS["fused_conv"].backward(node, saved, dy, params, Ctx())
    np.testing.assert_array_equal(dr, dy)


# ---- fused_mul: x · act(g), the squeeze-excitation product with its gate's activation ---------

def mul_reference(act, args, x, g, dy):
    """act then mul, the unfused kernels: (y, dx, dg)."""
    node = act_nodes(act, args, g.shape[1:])
    mul, _ = make_node("mul", {}, [x.shape[1:], g.shape[1:]])
    a, act_saved = (g, None) if node is None else kernel(act).forward(node, [g], {}, Ctx())
    y, saved = KERNELS["mul"].forward(mul, [x, a], {}, Ctx())
    (dx, da), _ = KERNELS["mul"].backward(mul, saved, dy, {}, Ctx())
    dg = da if node is None else kernel(act).backward(node, act_saved, da, {}, Ctx())[0][0]
    return y, dx, dg


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", act_cases(), ids=act_id)
def test_fused_mul_matches_act_then_mul(act, dtype):
    rng = seed("fused_mul", act, dtype.__name__)
    node, _ = make_node("fused_mul", epilogue_attrs(*act), [(5, 4, 3), (5, 1, 1)])
    x = rng.normal(size=(BATCH, 5, 4, 3)).astype(dtype)
    g = rng.normal(0, 4.0, size=(BATCH, 5, 1, 1)).astype(dtype)  # past the kinks at ±3 and 6
    dy = rng.normal(size=x.shape).astype(dtype)
    originals = [v.copy() for v in (x, g, dy)]
    y, saved = KERNELS["fused_mul"].forward(node, [x, g], {}, Ctx())
    (dx, dg), dps = KERNELS["fused_mul"].backward(node, saved, dy, {}, Ctx())
    y_ref, dx_ref, dg_ref = mul_reference(*act, x, g, dy)
    close(y, y_ref, dtype, "forward")
    close(dx, dx_ref, dtype, "dx")
    close(dg, dg_ref, dtype, "dgate")
    assert dps == {}
    for v, o in zip((x, g, dy), originals):
        np.testing.assert_array_equal(v, o)


@pytest.mark.parametrize("act", [("hardsigmoid", ()), ("sigmoid", ()), ("gelu", ()), ("elu", (0.4,)),
                                 ("leaky_relu", (-0.3,)), ("none", ())], ids=act_id)
def test_fused_mul_finite_differences(act):
    rng = seed("fused_mul-fd", act)
    node, _ = make_node("fused_mul", epilogue_attrs(*act), [(3, 4, 5), (3, 1, 1)])
    fd_check(node, [rng.normal(size=(BATCH, 3, 4, 5)), rng.normal(0, 2.0, size=(BATCH, 3, 1, 1))], {}, rng)


# ---- fused_bn -----------------------------------------------------------------------------------

def bn_inputs(shape, dtype, rng, affine=True):
    """x far from zero mean (a float32 cancellation trap), γ and β that put the normalised values
    past every activation's kinks (0, ±3, 6), dy; running statistics as make_params draws them."""
    node, specs = make_node("batchnorm", dict(affine=affine), [shape])
    params = make_params(specs, rng, dtype)
    if affine:
        params["weight"] = rng.uniform(2.0, 5.0, params["weight"].shape).astype(dtype) * rng.choice([-1, 1], shape[0])
        params["bias"] = rng.uniform(-2.0, 4.0, params["bias"].shape).astype(dtype)
    x = (3.0 + 2.0 * rng.normal(size=(BATCH * 4, *shape))).astype(dtype)
    return x, params, rng.normal(size=x.shape).astype(dtype)


def bn_then_act(act, args, x, params, dy, training, affine=True):
    """batchnorm, then the activation's own kernel: y, dx, dparams, parameters after forward."""
    ctx = Ctx(training=training)
    p = {k: v.copy() for k, v in params.items()}
    bn, _ = make_node("batchnorm", dict(affine=affine), [x.shape[1:]])
    y, s_bn = KERNELS["batchnorm"].forward(bn, [x], p, ctx)
    anode = act_nodes(act, args, x.shape[1:])
    if anode is not None:
        y, s_act = kernel(act).forward(anode, [y], {}, ctx)
        (dy,), _ = kernel(act).backward(anode, s_act, dy, {}, ctx)
    (dx,), dps = KERNELS["batchnorm"].backward(bn, s_bn, dy, p, ctx)
    return y, dx, dps, p


def fused_bn_run(act, args, x, params, dy, training, affine=True):
    ctx = Ctx(training=training)
    p = {k: v.copy() for k, v in params.items()}
    node, _ = make_node("fused_bn", dict(affine=affine, **epilogue_attrs(act, args)), [x.shape[1:]])
    originals = [v.copy() for v in (x, dy)]
    y, saved = KERNELS["fused_bn"].forward(node, [x], p, ctx)
    (dx,), dps = KERNELS["fused_bn"].backward(node, saved, dy, p, ctx)
    for v, o in zip((x, dy), originals):
        np.testing.assert_array_equal(v, o)  # x and dy are never written
    return y, dx, dps, p


@pytest.mark.parametrize("shape", [(6, 20, 24), (37,)], ids=["4d", "flat"])
@pytest.mark.parametrize("path", ["compiled", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", act_cases(), ids=act_id)
def test_fused_bn_equals_batchnorm_then_activation_to_the_bit(act, dtype, training, path, shape, monkeypatch):
    """fused_bn gives the unfused kernels' bits: the forward values, dx, dγ, dβ and the running
    statistics, on the compiled loops and on the plain NumPy path (the fused training plan of
    `cnnc train` relies on this), on N×C×H×W at a size that splits over two threads and on N×F."""
    if path == "compiled":
        pytest.importorskip("numba")
    monkeypatch.setenv("CNNC_JIT", "1" if path == "compiled" else "0")
    monkeypatch.setattr(parallel, "_threads", 2)
    rng = seed("fused_bn", act, dtype.__name__, training, shape)
    x, params, dy = bn_inputs(shape, dtype, rng)
    got = fused_bn_run(*act, x, params, dy, training)
    want = bn_then_act(*act, x, params, dy, training)
    if act[0] == "relu6" and len(shape) == 3:
        assert (got[0] == 6).any() and (got[0] == 0).any() and ((got[0] > 0) & (got[0] < 6)).any()
    for what, a, b in zip(("y", "dx"), got[:2], want[:2]):
        assert a.dtype == dtype, what
        np.testing.assert_array_equal(a, b, err_msg=what)
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(got[2][k], want[2][k], err_msg=f"d {k}")
    for k in params:  # the running statistics, updated in place in training
        np.testing.assert_array_equal(got[3][k], want[3][k], err_msg=k)


@pytest.mark.parametrize("path", ["compiled", "plain"])
@pytest.mark.parametrize("act", [("relu6", ()), ("relu", ()), ("hardswish", ()), ("hardsigmoid", ()),
                                 ("leaky_relu", (-0.3,)), ("silu", ()), ("gelu", ()), ("none", ())], ids=act_id)
def test_fused_bn_finite_differences(act, path, monkeypatch):
    """float64 central differences through the batch statistics, past the activations' kinks."""
    if path == "compiled":
        pytest.importorskip("numba")
    monkeypatch.setenv("CNNC_JIT", "1" if path == "compiled" else "0")
    rng = seed("fused_bn-fd", act)
    x, params, _ = bn_inputs((3, 4, 5), np.float64, rng)
    x = x[:2]
    node, _ = make_node("fused_bn", epilogue_attrs(*act), [x.shape[1:]])
    k = KERNELS["fused_bn"]
    ctx = Ctx(training=True)

    def forward():
        return k.forward(node, [x], {kk: v.copy() for kk, v in params.items()}, ctx)

    y, saved = forward()
    rr = rng.normal(size=y.shape)
    (dx,), dps = k.backward(node, saved, rr.copy(), params, ctx)

    def loss():
        return float(np.sum(forward()[0] * rr))

    err = rel(dx, _numeric(loss, x, 1e-6))
    assert err <= 1e-6, f"dx: relative error {err:.2e}"
    for name in ("weight", "bias"):
        err = rel(dps[name], _numeric(loss, params[name], 1e-6))
        assert err <= 1e-6, f"{name}: relative error {err:.2e}"


def test_backend_offers_the_fused_ops():
    fused_ops = {"fused_conv", "fused_dense", "fused_bn", "fused_mul", "elemwise_chain", "layout_transform"}
    assert NumpyBackend.fused_ops == fused_ops
    assert fused_ops <= set(NumpyBackend.kernels)
    assert all(not OPS[op].user for op in fused_ops)
