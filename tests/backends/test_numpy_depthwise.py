"""The NumPy backend's depthwise convolution (backends/numpy/depthwise.py; its C kernels in
cdepthwise.py, every test on both paths).

Every conv with one group per input channel takes it. Checked against PyTorch's grouped
conv2d (output, input gradient, weight and bias gradients; float32 and float64) over strides
1, 2 and 3, kernels 1 to 7, padding (symmetric, asymmetric, larger than the kernel's reach),
dilation, floor and ceil rounding, channel multipliers, odd sizes and batches of 1 and more;
against float64 finite differences; inside fused conv epilogues; and split into blocks that
straddle images and over threads.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from test_numpy_grad import _numeric, make_node, make_params, rel  # noqa: E402

from cnnc.backends.base import Ctx  # noqa: E402
from cnnc.backends.numpy import NumpyBackend, cdepthwise, cthreads, depthwise, direct, parallel  # noqa: E402
from cnnc.backends.numpy.kernels import KERNELS  # noqa: E402
from cnnc.compiler.ops import OPS  # noqa: E402

NumpyBackend()
TOL = {np.float32: 2e-6, np.float64: 1e-12}


@pytest.fixture(autouse=True, params=["compiled", "plain"])
def path(request, monkeypatch):
    """Every test on both paths: the C kernels (cdepthwise.py, one filter per channel) and the
    NumPy kernel (the reference, and what channel multipliers always take)."""
    monkeypatch.setenv("CNNC_JIT", "1" if request.param == "compiled" else "0")
    if request.param == "compiled" and not direct.available():
        pytest.skip("no C compiler for the depthwise kernels")
    return request.param

# id: (conv attributes without filters and groups, input C×H×W, multiplier, batch)
CASES = {
    "3x3-s1-pad1": (dict(kernel=3, pad=1), (8, 9, 11), 1, 1),
    "3x3-s1-pad1-b3": (dict(kernel=3, pad=1, bias=False), (5, 7, 6), 1, 3),
    "3x3-valid": (dict(kernel=3), (4, 8, 7), 1, 2),
    "3x3-s2-floor": (dict(kernel=3, stride=2, pad=1, round="floor"), (6, 13, 12), 1, 3),
    "3x3-s2-ceil": (dict(kernel=3, stride=2, pad=1, round="ceil"), (3, 12, 13), 1, 2),
    "3x3-s2-asym-floor": (dict(kernel=3, stride=2, pad=(1, 0, 2, 1), round="floor"), (4, 9, 8), 1, 2),
    "3x3-bigpad": (dict(kernel=3, pad=(3, 1, 0, 2)), (3, 6, 5), 1, 2),
    "3x3-s3-floor": (dict(kernel=3, stride=3, pad=0, round="floor"), (3, 11, 10), 1, 2),
    "5x5-s1-pad2": (dict(kernel=5, pad=2), (5, 10, 9), 1, 2),
    "5x5-s2-pad2-floor": (dict(kernel=5, stride=2, pad=2, round="floor"), (7, 15, 14), 1, 1),
    "7x7-s1-pad3": (dict(kernel=7, pad=3, bias=False), (4, 12, 9), 1, 2),
    "7x7-s2-pad3-floor": (dict(kernel=7, stride=2, pad=3, round="floor"), (3, 17, 16), 1, 2),
    "3x3-dil2-pad2": (dict(kernel=3, dilation=2, pad=2), (5, 11, 10), 1, 2),
    "3x3-dil3-s2-floor": (dict(kernel=3, stride=2, dilation=3, pad=3, round="floor"), (3, 13, 12), 1, 2),
    "3x3-dil-stride-mixed": (dict(kernel=3, stride=(1, 2), dilation=(2, 1), pad=(2, 0, 1, 2), round="floor"),
                             (3, 8, 9), 1, 2),
    "1x3": (dict(kernel=(1, 3), pad=(0, 0, 1, 1)), (4, 5, 7), 1, 2),
    "1x1-s2-floor": (dict(kernel=1, stride=2, round="floor"), (4, 7, 6), 1, 2),
    "x2-3x3-pad1": (dict(kernel=3, pad=1), (3, 9, 9), 2, 2),
    "x3-5x5-s2-floor": (dict(kernel=5, stride=2, pad=2, round="floor", bias=False), (2, 11, 10), 3, 2),
}
SMALL = ["3x3-s1-pad1-b3", "3x3-s2-floor", "3x3-s2-ceil", "3x3-bigpad", "3x3-s3-floor", "5x5-s2-pad2-floor",
         "7x7-s1-pad3", "3x3-dil3-s2-floor", "3x3-dil-stride-mixed", "1x1-s2-floor", "x3-5x5-s2-floor"]


def seed(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def case_node(case: str, op: str = "conv", **extra):
    kw, shape, mult, batch = CASES[case]
    kw = dict(kw, filters=mult * shape[0], groups=shape[0])
    shapes = [shape]
    if extra.get("residual"):  # the residual input has the conv's output shape
        shapes.append(tuple(OPS["conv"].shape(OPS["conv"].attrs(**kw), [shape])))
    node, specs = make_node(op, dict(kw, **extra), shapes)
    return node, specs, batch


def torch_conv(node, x, weight, bias):
    """PyTorch's grouped conv2d on x padded (or cropped) to exactly the rows and columns the
    windows span, as the backend computes it."""
    a = node.attrs
    _, oh, ow = node.out_shape
    t, _, l, _ = node.pads
    hp = (oh - 1) * a.stride[0] + a.dilation[0] * (a.kernel[0] - 1) + 1
    wp = (ow - 1) * a.stride[1] + a.dilation[1] * (a.kernel[1] - 1) + 1
    xp = F.pad(x, (l, wp - x.shape[3] - l, t, hp - x.shape[2] - t))
    return F.conv2d(xp, weight, bias, a.stride, 0, a.dilation, a.groups)


def close(got, want, dtype, what):
    assert got.shape == want.shape and got.dtype == dtype, what
    err = rel(got, want)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e}"


def test_depthwise_nodes_take_the_depthwise_path():
    rng = seed("path")
    for kw, shape, depthwise_ in [(dict(filters=4, kernel=3, groups=4, pad=1), (4, 6, 6), True),
                                  (dict(filters=8, kernel=3, groups=4, pad=1), (4, 6, 6), True),
                                  (dict(filters=4, kernel=3, groups=2, pad=1), (4, 6, 6), False),
                                  (dict(filters=3, kernel=3, pad=1), (1, 6, 6), False),
                                  (dict(filters=4, kernel=3, pad=1), (16, 6, 6), False)]:
        node, specs = make_node("conv", kw, [shape])
        x = rng.normal(size=(2, *shape)).astype(np.float32)
        _, saved = KERNELS["conv"].forward(node, [x], make_params(specs, rng, np.float32), Ctx())
        assert (isinstance(saved[0], str) and saved[0] == "depthwise") == depthwise_, kw


def test_the_c_kernels_run_where_the_path_says(path, monkeypatch):
    """One filter per channel takes the C kernels on the compiled path (forward and backward) and
    never on the plain one; a channel multiplier never does."""
    calls = []
    for name in ("forward", "backward"):
        real = getattr(cdepthwise, name)
        monkeypatch.setattr(cdepthwise, name, lambda *a, _f=real, _n=name: (calls.append(_n), _f(*a))[1])
    for case, want in [("3x3-s2-floor", path == "compiled"), ("x2-3x3-pad1", False)]:
        calls.clear()
        node, specs, batch = case_node(case)
        rng = seed("which", case)
        x = rng.normal(size=(batch, *node.in_shapes[0])).astype(np.float32)
        w = rng.normal(size=(node.out_shape[0], 1, *node.attrs.kernel)).astype(np.float32)
        y = depthwise.forward(node, x, w)
        depthwise.backward(node, x, np.ones_like(y), w)
        assert calls == (["forward", "backward"] if want else []), case


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, dtype):
    node, specs, batch = case_node(case)
    rng = seed(case, dtype.__name__)
    x = rng.normal(size=(batch, *node.in_shapes[0])).astype(dtype)
    params = make_params(specs, rng, dtype)
    dy = rng.normal(size=(batch, *node.out_shape)).astype(dtype)
    originals = [a.copy() for a in (x, dy, *params.values())]
    k = KERNELS["conv"]
    y, saved = k.forward(node, [x], params, Ctx(training=True))
    (dx,), dps = k.backward(node, saved, dy, params, Ctx(training=True))
    for a, o in zip((x, dy, *params.values()), originals):
        np.testing.assert_array_equal(a, o)  # nothing written into inputs, dy or parameters

    tt = {name: torch.tensor(v, requires_grad=True) for name, v in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_conv(node, xt, tt["weight"], tt.get("bias"))
    grads = torch.autograd.grad(yt, [xt, *tt.values()], torch.tensor(dy))
    close(y, yt.detach().numpy(), dtype, "y")
    close(dx, grads[0].numpy(), dtype, "dx")
    assert sorted(dps) == sorted(tt)
    for name, g in zip(tt, grads[1:]):
        close(dps[name], g.numpy(), dtype, f"d {name}")


def random_cases(count: int):
    """(id, conv attributes, input C×H×W, batch) of `count` shapes drawn with a fixed seed:
    kernels 1-7, strides 1-3, dilations 1-3, padding, planes 1-29 wide."""
    rng = seed("random shapes")
    cases = []
    while len(cases) < count:
        k, s, d = int(rng.choice([1, 3, 5, 7])), int(rng.integers(1, 4)), int(rng.choice([1, 1, 2, 3]))
        h, w = (int(rng.integers(1 + (k - 1) * d, 30)) for _ in range(2))
        kw = dict(kernel=k, stride=s, dilation=d, pad=int(rng.integers(0, k)), round="floor")
        cases.append((f"k{k}-s{s}-d{d}-{h}x{w}", kw, (int(rng.integers(2, 6)), h, w), int(rng.integers(1, 3))))
    return cases


@pytest.mark.parametrize("vector_bytes", [direct.NARROW_VECTOR_BYTES, direct.WIDE_VECTOR_BYTES])
def test_random_shapes_match_torch(vector_bytes, path, monkeypatch):
    """Forty drawn shapes in float64 against PyTorch, on the compiled path in both vector sizes
    (a compiler once got lanes of one size wrong on some shapes only)."""
    if path == "compiled":
        monkeypatch.setattr(cdepthwise, "_vector_bytes", lambda dtype: vector_bytes)
    elif vector_bytes != direct.NARROW_VECTOR_BYTES:
        pytest.skip("the plain path has no vector size")
    k = KERNELS["conv"]
    for cid, kw, shape, batch in random_cases(40):
        node, specs = make_node("conv", dict(kw, filters=shape[0], groups=shape[0]), [shape])
        rng = seed("random", cid)
        x = rng.normal(size=(batch, *shape))
        params = make_params(specs, rng, np.float64)
        dy = rng.normal(size=(batch, *node.out_shape))
        y, saved = k.forward(node, [x], params, Ctx(training=True))
        (dx,), dps = k.backward(node, saved, dy, params, Ctx(training=True))
        tt = {name: torch.tensor(v, requires_grad=True) for name, v in params.items()}
        xt = torch.tensor(x, requires_grad=True)
        yt = torch_conv(node, xt, tt["weight"], tt.get("bias"))
        grads = torch.autograd.grad(yt, [xt, *tt.values()], torch.tensor(dy))
        checks = [(y, yt.detach(), "y"), (dx, grads[0], "dx")] + [(dps[n], g, f"d {n}") for n, g in zip(tt, grads[1:])]
        for got, want, what in checks:
            close(got, want.numpy(), np.float64, f"{cid}: {what}")


@pytest.mark.parametrize("case", SMALL)
def test_finite_differences(case):
    node, specs, batch = case_node(case)
    rng = seed("fd", case)
    x = rng.normal(size=(batch, *node.in_shapes[0]))
    params = make_params(specs, rng, np.float64)
    k = KERNELS["conv"]
    y, saved = k.forward(node, [x], params, Ctx(training=True))
    r = rng.normal(size=y.shape)
    (dx,), dps = k.backward(node, saved, r.copy(), params, Ctx(training=True))

    def loss() -> float:
        return float(np.sum(k.forward(node, [x], params, Ctx(training=True))[0] * r))

    assert rel(dx, _numeric(loss, x, 1e-6)) <= 1e-7
    for name in params:
        assert rel(dps[name], _numeric(loss, params[name], 1e-6)) <= 1e-7, name


def test_input_gradient_can_be_skipped():
    node, specs, batch = case_node("3x3-s2-floor")
    rng = seed("skip")
    x = rng.normal(size=(batch, *node.in_shapes[0])).astype(np.float32)
    params = make_params(specs, rng, np.float32)
    dy = rng.normal(size=(batch, *node.out_shape)).astype(np.float32)
    k = KERNELS["conv"]
    _, saved = k.forward(node, [x], params, Ctx(training=True))
    (dx,), dps = k.backward(node, saved, dy, params, Ctx(training=True))
    (none,), dps_only = k.backward(node, saved, dy, params, Ctx(training=True, need_input_grad=False))
    assert none is None and dx is not None
    for name in dps:
        np.testing.assert_array_equal(dps_only[name], dps[name])


@pytest.mark.parametrize("case", ["3x3-s1-pad1-b3", "3x3-s2-floor", "x3-5x5-s2-floor", "1x1-s2-floor"])
def test_blocks_and_threads_give_the_one_block_result(case, monkeypatch):
    """Blocks of a few planes (crossing image boundaries, the last one short) on 2 threads:
    the same values as one block on one thread, in float64 to the last bits but summation order."""
    node, specs, batch = case_node(case)
    rng = seed("blocks", case)
    batch = 5
    x = rng.normal(size=(batch, *node.in_shapes[0]))
    params = make_params(specs, rng, np.float64)
    dy = rng.normal(size=(batch, *node.out_shape))
    k = KERNELS["conv"]

    def run():
        y, saved = k.forward(node, [x], params, Ctx(training=True))
        (dx,), dps = k.backward(node, saved, dy, params, Ctx(training=True))
        return [y, dx, dps["weight"]]

    threads = parallel.get_threads()
    try:
        parallel.set_threads(1)
        monkeypatch.setattr(depthwise, "BLOCK_BYTES", 1 << 30)
        whole = run()
        parallel.set_threads(2)
        monkeypatch.setattr(depthwise, "THREAD_MIN_BLOCKS", 1)
        g = depthwise.geometry(node, *node.in_shapes[0][1:])
        monkeypatch.setattr(depthwise, "BLOCK_BYTES", 3 * (g.ntaps + 1) * g.plane * 8)  # 3 planes a block
        assert g.block(g.ntaps + 1, 8) == 3
        planes = batch * node.in_shapes[0][0]
        assert len(depthwise._thread_slices(planes, 3)) == 2
        split = run()
    finally:
        parallel.set_threads(threads)
    for got, want, what in zip(split, whole, ["y", "dx", "d weight"]):
        assert rel(got, want) <= 1e-14, what


@pytest.mark.parametrize("case", ["3x3-s1-pad1-b3", "3x3-s2-asym-floor", "5x5-s2-pad2-floor", "3x3-dil3-s2-floor"])
def test_c_kernels_split_over_threads_give_the_one_thread_result(case, path, monkeypatch):
    """The C kernels' planes in chunks over 2 threads (cthreads.py's workers): each plane is
    computed alone, so the values equal one thread's to the bit."""
    if path != "compiled":
        pytest.skip("the C kernels' chunks")
    node, specs, _ = case_node(case)
    rng = seed("chunks", case)
    x = rng.normal(size=(5, *node.in_shapes[0]))
    params = make_params(specs, rng, np.float64)
    dy = rng.normal(size=(5, *node.out_shape))
    k = KERNELS["conv"]
    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    monkeypatch.setattr(cthreads, "MIN_WORK", 0)
    results, splits = [], []
    threads, run = parallel.get_threads(), cthreads.run
    monkeypatch.setattr(cthreads, "run", lambda fn, args, slices: (splits.append(len(slices)), run(fn, args, slices))[1])
    try:
        for t in (1, 2):
            parallel.set_threads(t)
            splits.clear()
            y, saved = k.forward(node, [x], params, Ctx(training=True))
            (dx,), dps = k.backward(node, saved, dy, params, Ctx(training=True))
            # the forward's and the backward's loops (and the bias gradient's sums), a chunk a thread
            assert splits == [t] * (3 if "bias" in params else 2)
            results.append([y, dx, dps["weight"]])
    finally:
        parallel.set_threads(threads)
    for got, want, what in zip(*results, ["y", "dx", "d weight"]):
        np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("act", ["relu6", "silu", "none"])
@pytest.mark.parametrize("case", ["3x3-s1-pad1-b3", "5x5-s2-pad2-floor"])
def test_fused_conv_epilogue(case, act):
    """conv + bias (BatchNorm folded at -O2) + residual + activation on a depthwise conv,
    forward and backward against PyTorch."""
    stride1 = CASES[case][0].get("stride", 1) == 1
    node, specs, batch = case_node(case, "fused_conv", activation=act, bias=True, residual=stride1)
    rng = seed("fused", case, act)
    x = rng.normal(0, 2, size=(batch, *node.in_shapes[0]))
    params = make_params(specs, rng, np.float64)
    res = rng.normal(size=(batch, *node.out_shape)) if stride1 else None
    dy = rng.normal(size=(batch, *node.out_shape))
    k = KERNELS["fused_conv"]
    xs = [x, res] if stride1 else [x]
    y, saved = k.forward(node, xs, params, Ctx(training=True))
    dxs, dps = k.backward(node, saved, dy, params, Ctx(training=True))

    xt = torch.tensor(x, requires_grad=True)
    wt, bt = (torch.tensor(params[n], requires_grad=True) for n in ("weight", "bias"))
    leaves = [xt, wt, bt]
    zt = torch_conv(node, xt, wt, bt)
    if stride1:
        rt = torch.tensor(res, requires_grad=True)
        leaves.append(rt)
        zt = zt + rt
    yt = {"relu6": F.relu6, "silu": F.silu, "none": lambda v: v}[act](zt)
    grads = torch.autograd.grad(yt, leaves, torch.tensor(dy))
    close(y, yt.detach().numpy(), np.float64, "y")
    close(dxs[0], grads[0].numpy(), np.float64, "dx")
    close(dps["weight"], grads[1].numpy(), np.float64, "d weight")
    close(dps["bias"], grads[2].numpy(), np.float64, "d bias")
    if stride1:
        close(dxs[1], grads[3].numpy(), np.float64, "d residual")


@pytest.mark.parametrize("direct", [0, 25], ids=["no-phase-direct", "every-phase-direct"])
@pytest.mark.parametrize("case", ["3x3-s1-pad1-b3", "3x3-s2-asym-floor", "5x5-s2-pad2-floor", "3x3-s3-floor",
                                  "3x3-dil3-s2-floor", "x2-3x3-pad1"])
def test_input_gradient_by_phase_either_way(case, direct, monkeypatch):
    """The input gradient of every stride phase summed straight into dx (broadcast products, one
    to all of its taps), or none of them (copied runs and a matmul): PyTorch's values either way.
    By default only phases of one tap go straight into dx; channel multipliers never do."""
    monkeypatch.setattr(depthwise, "DIRECT_TAPS", direct)
    node, specs, batch = case_node(case)
    rng = seed("direct", case)
    x = rng.normal(size=(batch, *node.in_shapes[0]))
    params = make_params(specs, rng, np.float64)
    dy = rng.normal(size=(batch, *node.out_shape))
    k = KERNELS["conv"]
    _, saved = k.forward(node, [x], params, Ctx(training=True))
    (dx,), dps = k.backward(node, saved, dy, params, Ctx(training=True))
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(params["weight"], requires_grad=True)
    bt = torch.tensor(params["bias"], requires_grad=True) if "bias" in params else None
    yt = torch_conv(node, xt, wt, bt)
    gx, gw = torch.autograd.grad(yt, [xt, wt], torch.tensor(dy))
    close(dx, gx.numpy(), np.float64, "dx")
    close(dps["weight"], gw.numpy(), np.float64, "d weight")


@pytest.mark.parametrize("act", ["relu6", "silu", "none"])
@pytest.mark.parametrize("case", ["3x3-s1-pad1-b3", "5x5-s2-pad2-floor", "3x3-dil-stride-mixed"])
def test_the_c_kernel_runs_the_fused_epilogue_plane_by_plane_as_the_separate_pass_would(case, act, path, monkeypatch):
    """float32 inference: a fused depthwise conv's epilogue (bias, residual, activation) run by the
    C kernel on each plane as it is done gives the separate pass's values to the bit, and says so
    (ConvEpilogue.done); on the plain path it is the separate pass."""
    from cnnc.backends.numpy import conv, fused
    stride1 = CASES[case][0].get("stride", 1) == 1
    node, specs, batch = case_node(case, "fused_conv", activation=act, bias=True, residual=stride1)
    rng = seed("in the kernel", case, act)
    x = rng.normal(0, 2, size=(batch, *node.in_shapes[0])).astype(np.float32)
    params = make_params(specs, rng, np.float32)
    xs = [x] + ([rng.normal(size=(batch, *node.out_shape)).astype(np.float32)] if stride1 else [])
    done = []
    real_done = conv.ConvEpilogue.done
    monkeypatch.setattr(conv.ConvEpilogue, "done", lambda self: done.append(1) or real_done(self))
    y, _ = fused.fused_conv_forward(node, xs, params, Ctx())
    assert done == ([1] if path == "compiled" else [])
    monkeypatch.setattr(conv.ConvEpilogue, "deferred", lambda self, y: None)
    separate, _ = fused.fused_conv_forward(node, xs, params, Ctx())
    assert done == ([1] if path == "compiled" else [])
    np.testing.assert_array_equal(y, separate)


@pytest.mark.parametrize("case", ["3x3-s1-pad1", "5x5-s2-pad2-floor"])
def test_a_plain_depthwise_conv_has_its_bias_added_in_the_c_kernel_as_numpy_adds_it(case, path, monkeypatch):
    """A plain depthwise conv with a bias (float32): the C kernel adds it plane by plane, to the bit
    NumPy's addition after the kernel (which the plain path does)."""
    from cnnc.backends.numpy import conv
    node, specs, batch = case_node(case)
    rng = seed("own bias", case)
    x = rng.normal(0, 2, size=(batch, *node.in_shapes[0])).astype(np.float32)
    params = make_params(specs, rng, np.float32)
    ran = []
    real_done = conv.ConvEpilogue.done
    monkeypatch.setattr(conv.ConvEpilogue, "done", lambda self: ran.append(1) or real_done(self))
    y, _ = conv.conv_forward(node, [x], params, Ctx())
    assert ran == ([1] if path == "compiled" else [])
    plain, _ = conv.conv_forward(node, [x], {"weight": params["weight"]}, Ctx())
    np.testing.assert_array_equal(y, plain + params["bias"].reshape(1, -1, 1, 1))
