"""The NumPy backend's backward kernels against central finite differences, in float64.

Every op (several attribute combinations each) runs forward on small random inputs; the scalar
loss sum(y · R) with a random R gives the analytic gradients from the backward kernel, which must
match finite differences for every input element and every trainable parameter element.
`CASES` and `make_node` are shared with test_numpy_vs_torch.py.
"""

from __future__ import annotations

from dataclasses import dataclass
import zlib
from importlib import metadata

import numpy as np
import pytest

from cnnc.backends.base import Ctx, NodeInfo
from cnnc.backends.numpy import NumpyBackend
from cnnc.backends.numpy.losses import cross_entropy, mse
from cnnc.compiler.ops import OPS, resolve_pads
from cnnc.dsl.errors import CnncError

BATCH = 2
BACKEND = NumpyBackend()


@pytest.fixture(autouse=True)
def shifted_convs_at_small_sizes(monkeypatch):
    """The shifted-window conv and Winograd are chosen for large maps (and Winograd for many
    channels) only; these small cases take them whenever they have 16+ channels, so that finite
    differences check them too. The direct conv (the heuristic's choice for few channels where a
    C compiler is there) has its own finite differences, test_numpy_direct.py."""
    from cnnc.backends.numpy import conv
    monkeypatch.setattr(conv, "DIRECT_MAX_CHANNELS", 0)
    monkeypatch.setattr(conv, "SHIFTED_MAX_GRID", 4.0)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 16)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_POSITIONS", 1)


@dataclass
class Case:
    id: str
    op: str
    kw: dict
    shapes: list  # leaf input shapes, batch excluded
    use: list | None = None  # the leaf feeding each input, in order (fan-out); default: each once
    training: bool = True
    scale: float = 1.0  # input spread (relu6 needs values past 6)

    @property
    def inputs(self) -> list[int]:
        return self.use if self.use is not None else list(range(len(self.shapes)))


C = Case
CASES = [
    C("conv-basic", "conv", dict(filters=4, kernel=3), [(3, 7, 7)]),
    C("conv-same", "conv", dict(filters=4, kernel=3, pad="same"), [(3, 6, 6)]),
    C("conv-stride2-asympad", "conv", dict(filters=4, kernel=3, stride=2, pad=(1, 0, 2, 1)), [(3, 8, 8)]),
    C("conv-stride2-floor", "conv", dict(filters=3, kernel=3, stride=2, round="floor"), [(2, 8, 9)]),
    C("conv-stride2-ceil", "conv", dict(filters=3, kernel=3, stride=2, round="ceil"), [(2, 8, 9)]),
    C("conv-dilation2", "conv", dict(filters=3, kernel=3, dilation=2, pad=2), [(2, 8, 8)]),
    C("conv-dilation-stride-asym", "conv", dict(filters=3, kernel=3, stride=(1, 2), dilation=(2, 1),
                                                pad=(2, 0, 1, 2), round="floor"), [(2, 8, 8)]),
    C("conv-bigpad", "conv", dict(filters=3, kernel=3, pad=(3, 1, 0, 2)), [(2, 6, 6)]),
    C("conv-groups2", "conv", dict(filters=6, kernel=3, groups=2, pad=1), [(4, 6, 6)]),
    C("conv-depthwise", "conv", dict(filters=4, kernel=3, groups=4, pad=1, stride=2), [(4, 7, 7)]),
    C("conv-depthwise-x2", "conv", dict(filters=8, kernel=3, groups=4, pad=1), [(4, 6, 6)]),
    C("conv-1x3-nobias", "conv", dict(filters=4, kernel=(1, 3), bias=False, pad=(0, 0, 1, 1)), [(3, 5, 6)]),
    C("conv-1x1", "conv", dict(filters=5, kernel=1), [(3, 5, 5)]),
    # one window, the whole input (LeNet-5's C5): im2col's one gemm for the batch
    C("conv-covers-input", "conv", dict(filters=7, kernel=(3, 4)), [(3, 3, 4)]),
    C("conv-covers-input-nobias", "conv", dict(filters=2, kernel=5, bias=False), [(2, 5, 5)]),
    C("conv-1x1-groups", "conv", dict(filters=4, kernel=1, groups=2), [(4, 5, 5)]),
    C("conv-1x1-stride2", "conv", dict(filters=4, kernel=1, stride=2, round="floor"), [(3, 6, 6)]),
    # 16+ channels, stride 1: the shifted-window path (checked to be taken in test_shifted_path_*)
    C("conv-shifted-same", "conv", dict(filters=5, kernel=3, pad=1), [(16, 6, 6)]),
    C("conv-shifted-asym-dilated", "conv", dict(filters=4, kernel=3, dilation=2, pad=(2, 1, 0, 2)), [(16, 12, 12)]),
    C("conv-shifted-bigpad", "conv", dict(filters=3, kernel=3, pad=(3, 1, 0, 2)), [(16, 6, 6)]),
    C("conv-shifted-5x5-nobias", "conv", dict(filters=6, kernel=5, pad=2, bias=False), [(16, 10, 10)]),
    C("conv-shifted-1x3", "conv", dict(filters=4, kernel=(1, 3), pad=(0, 0, 1, 1)), [(17, 4, 6)]),
    # 3×3 stride 1 with 16+ channels in and out: Winograd F(2×2, 3×3) forward and input gradient
    C("conv-winograd-odd", "conv", dict(filters=16, kernel=3, pad=1), [(16, 5, 7)]),
    C("conv-winograd-valid-nobias", "conv", dict(filters=17, kernel=3, bias=False), [(16, 6, 5)]),
    C("conv-winograd-bigpad", "conv", dict(filters=16, kernel=3, pad=(3, 0, 1, 2)), [(16, 4, 4)]),
    C("conv-wide-col2im", "conv", dict(filters=8, kernel=5, pad=2), [(1, 6, 6)]),
    C("conv-wide-col2im-s1-asym", "conv", dict(filters=8, kernel=3, pad=(0, 2, 1, 0)), [(2, 6, 6)]),
    C("maxpool-2x2", "maxpool", dict(kernel=2), [(3, 6, 6)]),
    C("maxpool-3s2p1-floor", "maxpool", dict(kernel=3, stride=2, pad=1, round="floor"), [(3, 8, 8)]),
    C("maxpool-3s2-ceil", "maxpool", dict(kernel=3, stride=2, round="ceil"), [(3, 8, 8)]),
    C("maxpool-3s2p1-ceil", "maxpool", dict(kernel=3, stride=2, pad=1, round="ceil"), [(3, 8, 8)]),
    C("maxpool-3s1p1", "maxpool", dict(kernel=3, stride=1, pad=1), [(2, 5, 6)]),
    C("maxpool-asympad", "maxpool", dict(kernel=2, stride=2, pad=(1, 0, 1, 0)), [(2, 7, 7)]),
    C("avgpool-2x2", "avgpool", dict(kernel=2), [(3, 6, 6)]),
    C("avgpool-3s2p1-floor", "avgpool", dict(kernel=3, stride=2, pad=1, round="floor"), [(3, 8, 8)]),
    C("avgpool-3s2p1-floor-nopad", "avgpool", dict(kernel=3, stride=2, pad=1, round="floor", count_pad=False),
      [(3, 8, 8)]),
    C("avgpool-3s2-ceil", "avgpool", dict(kernel=3, stride=2, round="ceil"), [(3, 8, 8)]),
    C("avgpool-3s2p1-ceil", "avgpool", dict(kernel=3, stride=2, pad=1, round="ceil"), [(3, 8, 8)]),
    C("avgpool-3s2p1-ceil-nopad", "avgpool", dict(kernel=3, stride=2, pad=1, round="ceil", count_pad=False),
      [(3, 8, 8)]),
    C("avgpool-asympad", "avgpool", dict(kernel=2, stride=2, pad=(1, 0, 1, 0)), [(2, 7, 7)]),
    C("avgpool-asympad-nopad", "avgpool", dict(kernel=2, stride=2, pad=(1, 0, 1, 0), count_pad=False), [(2, 7, 7)]),
    C("globalavgpool", "globalavgpool", {}, [(3, 5, 4)]),
    C("adaptive-nondivisible", "adaptive_avgpool", dict(size=(3, 2)), [(3, 7, 5)]),
    C("adaptive-divisible", "adaptive_avgpool", dict(size=(3, 2)), [(3, 6, 4)]),
    C("adaptive-upsample", "adaptive_avgpool", dict(size=(5, 4)), [(2, 3, 3)]),
    C("dense", "dense", dict(units=4), [(5,)]),
    C("dense-c11", "dense", dict(units=3), [(6, 1, 1)]),
    C("dense-nobias", "dense", dict(units=3, bias=False), [(5,)]),
    C("flatten", "flatten", {}, [(3, 2, 2)]),
    C("relu", "relu", {}, [(3, 4, 4)]),
    C("leaky_relu", "leaky_relu", dict(slope=0.2), [(3, 4, 4)]),
    C("relu6", "relu6", {}, [(3, 4, 4)], scale=5.0),
    C("sigmoid", "sigmoid", {}, [(3, 4, 4)], scale=3.0),
    C("tanh", "tanh", {}, [(3, 4, 4)]),
    C("softmax-2d", "softmax", {}, [(6,)]),
    C("softmax-4d", "softmax", {}, [(4, 3, 3)]),
    C("dropout-train", "dropout", dict(rate=0.3), [(3, 4, 4)]),
    C("dropout-eval", "dropout", dict(rate=0.3), [(3, 4, 4)], training=False),
    C("identity", "identity", {}, [(3, 4, 4)]),
    C("batchnorm-train-4d", "batchnorm", {}, [(3, 4, 4)]),
    C("batchnorm-train-2d", "batchnorm", dict(momentum=0.3, eps=1e-3), [(5,)]),
    C("batchnorm-train-noaffine", "batchnorm", dict(affine=False), [(3, 4, 4)]),
    C("batchnorm-eval-4d", "batchnorm", {}, [(3, 4, 4)], training=False),
    C("batchnorm-eval-2d", "batchnorm", {}, [(5,)], training=False),
    # BatchNorm with its activation (fused_bn): generated loops for piecewise activations (relu6 reads
    # its output, hardswish and leaky_relu its input), the epilogue for the others (silu, sigmoid)
    C("fused_bn-relu6", "fused_bn", dict(activation="relu6"), [(3, 4, 4)]),
    C("fused_bn-hardswish", "fused_bn", dict(activation="hardswish"), [(3, 4, 4)]),
    C("fused_bn-leaky_relu-noaffine", "fused_bn", dict(activation="leaky_relu", act_args=(0.2,), affine=False),
      [(3, 4, 4)]),
    C("fused_bn-silu", "fused_bn", dict(activation="silu"), [(3, 4, 4)]),
    C("fused_bn-sigmoid", "fused_bn", dict(activation="sigmoid", momentum=0.3), [(3, 4, 4)]),
    C("fused_bn-relu-eval", "fused_bn", dict(activation="relu"), [(3, 4, 4)], training=False),
    C("fused_bn-none-2d", "fused_bn", dict(eps=1e-3), [(5,)]),
    # a residual block's bn → add → activation: the shortcut as the second input
    C("fused_bn-relu-residual", "fused_bn", dict(activation="relu", residual=True), [(3, 4, 4), (3, 4, 4)]),
    C("fused_bn-hardswish-residual", "fused_bn", dict(activation="hardswish", residual=True), [(3, 4, 4), (3, 4, 4)]),
    C("fused_bn-silu-residual-eval", "fused_bn", dict(activation="silu", residual=True), [(2, 3, 5), (2, 3, 5)],
      training=False),
    C("fused_bn-none-residual", "fused_bn", dict(residual=True, affine=False), [(3, 4, 4), (3, 4, 4)]),
    C("lrn-default", "lrn", {}, [(7, 3, 3)]),
    C("lrn-strong", "lrn", dict(size=3, alpha=0.5, beta=0.75, k=2.0), [(6, 3, 3)]),
    C("lrn-even", "lrn", dict(size=4, alpha=0.3, beta=0.6, k=1.5), [(6, 3, 3)]),
    C("add-2", "add", {}, [(3, 4, 4), (3, 4, 4)]),
    C("add-3", "add", {}, [(3, 4, 4), (3, 4, 4), (3, 4, 4)]),
    C("add-fanout", "add", {}, [(3, 4, 4)], use=[0, 0]),
    C("concat-3-fanout", "concat", {}, [(3, 4, 4), (2, 4, 4)], use=[0, 1, 0]),
    C("concat-2d", "concat", {}, [(3,), (4,), (2,)]),
    # channel and normalisation ops of modern blocks (backends/numpy/channel_ops.py)
    C("mul-equal", "mul", {}, [(3, 4, 4), (3, 4, 4)]),
    C("mul-gate-second", "mul", {}, [(3, 4, 5), (3, 1, 1)]),
    C("mul-gate-first", "mul", {}, [(3, 1, 1), (3, 4, 5)]),
    C("mul-flat", "mul", {}, [(5,), (5,)]),
    C("mul-fanout", "mul", {}, [(3, 4, 4)], use=[0, 0]),
    C("fused_mul-hardsigmoid", "fused_mul", dict(activation="hardsigmoid"), [(3, 4, 5), (3, 1, 1)], scale=2.0),
    C("fused_mul-elu", "fused_mul", dict(activation="elu", act_args=(0.4,)), [(3, 4, 4), (3, 1, 1)]),
    C("fused_mul-none", "fused_mul", {}, [(4, 3, 3), (4, 1, 1)]),
    C("prelu", "prelu", {}, [(3, 4, 4)]),
    C("prelu-shared", "prelu", dict(shared=True), [(3, 4, 4)]),
    C("prelu-flat", "prelu", {}, [(6,)]),
    C("layer_scale", "layer_scale", {}, [(4, 3, 3)]),
    C("layer_scale-flat", "layer_scale", dict(init=0.5), [(5,)]),
    C("channel_shuffle-2", "channel_shuffle", dict(groups=2), [(6, 3, 3)]),
    C("channel_shuffle-3", "channel_shuffle", dict(groups=3), [(6, 2, 3)]),
    C("channel_shuffle-1", "channel_shuffle", dict(groups=1), [(4, 2, 2)]),
    C("pad_channels-stride2", "pad_channels", dict(to=8, stride=2), [(4, 6, 6)]),
    C("pad_channels-odd", "pad_channels", dict(to=6, stride=2), [(3, 5, 5)]),
    C("pad_channels-same", "pad_channels", dict(to=5), [(5, 3, 3)]),
    C("layernorm", "layernorm", {}, [(5, 3, 3)]),
    C("layernorm-eps-noaffine", "layernorm", dict(eps=1e-3, affine=False), [(4, 3, 2)]),
    C("layernorm-flat", "layernorm", {}, [(7,)]),
    C("groupnorm-2", "groupnorm", dict(groups=2), [(6, 3, 3)]),
    C("groupnorm-1-noaffine", "groupnorm", dict(groups=1, affine=False, eps=1e-3), [(4, 3, 2)]),
    C("groupnorm-instance", "groupnorm", dict(groups=4), [(4, 3, 3)]),
    C("groupnorm-flat", "groupnorm", dict(groups=2), [(8,)]),
    C("stochastic_depth-train", "stochastic_depth", dict(rate=0.5), [(3, 4, 4)]),
    C("stochastic_depth-eval", "stochastic_depth", dict(rate=0.5), [(3, 4, 4)], training=False),
    C("stochastic_depth-flat", "stochastic_depth", dict(rate=0.3), [(6,)]),
    C("channel_slice", "channel_slice", dict(lo=1, hi=4), [(5, 3, 3)]),
    C("channel_slice-all", "channel_slice", dict(lo=0, hi=3), [(3, 2, 2)]),
    C("channel_slice-flat", "channel_slice", dict(lo=2, hi=5), [(6,)]),
]
# every other op the table gives an element-wise formula, over inputs spread past the kinks at ±3 and 6
CASES += [C(op, op, {}, [(3, 4, 4)], scale=4.0) for op in OPS if OPS[op].formula is not None
          and op not in {c.op for c in CASES}]
CASES += [C("elu-alpha", "elu", dict(alpha=0.4), [(3, 4, 4)], scale=2.0)]


def make_node(op: str, kw: dict, in_shapes: list) -> tuple[NodeInfo, list]:
    """A NodeInfo as the compiler builds it (shape rule, resolved pads) and the op's ParamSpecs."""
    d = OPS[op]
    attrs = d.attrs(**kw)
    in_shapes = [tuple(s) for s in in_shapes]
    out = tuple(d.shape(attrs, in_shapes))
    pads = None
    pad = getattr(attrs, "pad", None)
    if pad is not None and len(in_shapes[0]) == 3:
        dil = getattr(attrs, "dilation", (1, 1))
        kernel = (dil[0] * (attrs.kernel[0] - 1) + 1, dil[1] * (attrs.kernel[1] - 1) + 1)
        pads = resolve_pads(pad, in_shapes[0][1], in_shapes[0][2], kernel, getattr(attrs, "stride", None) or attrs.kernel)
    return NodeInfo(1, op, op, attrs, tuple(in_shapes), out, pads), d.params(attrs, in_shapes)


def make_params(specs, rng, dtype) -> dict[str, np.ndarray]:
    params = {}
    for s in specs:
        if s.name == "running_mean":
            params[s.name] = rng.normal(0, 0.3, s.shape)
        elif s.name == "running_var":
            params[s.name] = rng.uniform(0.5, 1.5, s.shape)
        else:
            params[s.name] = rng.normal(0, 0.5, s.shape)
    return {k: v.astype(dtype) for k, v in params.items()}


def make_leaves(case: Case, rng, dtype) -> list[np.ndarray]:
    return [(rng.normal(0, case.scale, (BATCH, *s))).astype(dtype) for s in case.shapes]


def ctx_for(case: Case) -> Ctx:
    return Ctx(training=case.training, rng=np.random.default_rng(7))  # a fresh, equal dropout mask each run


def _numeric(f, a: np.ndarray, eps: float) -> np.ndarray:
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backward_matches_finite_differences(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    node, specs = make_node(case.op, case.kw, [case.shapes[i] for i in case.inputs])
    kernel = BACKEND.kernel(case.op)
    leaves = make_leaves(case, rng, np.float64)
    params = make_params(specs, rng, np.float64)
    originals = [v.copy() for v in leaves]

    def forward():
        p = {k: v.copy() for k, v in params.items()}  # batchnorm updates its buffers in place
        return kernel.forward(node, [leaves[i] for i in case.inputs], p, ctx_for(case)), p

    (y, saved), p = forward()
    assert y.shape == (BATCH, *node.out_shape) and y.dtype == np.float64
    r = rng.normal(size=y.shape)
    dxs, dps = kernel.backward(node, saved, r.copy(), p, ctx_for(case))
    for v, o in zip(leaves, originals):
        np.testing.assert_array_equal(v, o)  # kernels never write into their inputs
    assert len(dxs) == len(case.inputs)

    def loss() -> float:
        return float(np.sum(forward()[0][0] * r))

    for leaf, v in enumerate(leaves):
        analytic = sum(dx for dx, i in zip(dxs, case.inputs) if i == leaf)
        assert analytic.shape == v.shape and analytic.dtype == np.float64
        err = rel(analytic, _numeric(loss, v, 1e-6))
        assert err <= 1e-6, f"input {leaf}: relative error {err:.2e}"
    trainable = [s.name for s in specs if not s.buffer]
    assert sorted(dps) == sorted(trainable)
    for name in trainable:
        assert dps[name].shape == params[name].shape and dps[name].dtype == np.float64
        err = rel(dps[name], _numeric(loss, params[name], 1e-6))
        assert err <= 1e-6, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient(smoothing):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4, 5))
    labels = np.array([0, 3, 4, 3])
    loss, grad = cross_entropy(logits, labels, label_smoothing=smoothing)
    assert isinstance(loss, float) and grad.dtype == np.float64
    assert rel(grad, _numeric(lambda: cross_entropy(logits, labels, label_smoothing=smoothing)[0], logits, 1e-6)) <= 1e-6


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], dtype=np.float32)
    loss, grad = cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(1e5 / 2, rel=1e-6)


def test_mse_gradient():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    loss, grad = mse(pred, target)
    assert loss == pytest.approx(np.mean((pred - target) ** 2))
    assert rel(grad, _numeric(lambda: mse(pred, target)[0], pred, 1e-6)) <= 1e-6


def test_losses_by_name_and_unknown_loss():
    assert BACKEND.loss("cross_entropy") is cross_entropy
    assert BACKEND.loss("mse") is mse
    with pytest.raises(CnncError, match="no loss `hinge`"):
        BACKEND.loss("hinge")
    with pytest.raises(CnncError, match="labels"):
        cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_every_op_has_a_kernel():
    """Ops with a formula run the one element-wise kernel; every other op (but the input) has its own."""
    formula = {op for op in OPS if OPS[op].formula is not None}
    assert set(BACKEND.kernels) == set(OPS) - {"input"} - formula
    assert all(BACKEND.kernel(op) is BACKEND.elementwise for op in formula)
    assert BACKEND.name == "numpy"


def test_arrays():
    b = BACKEND
    x = b.to_device(np.arange(6, dtype=np.float64).reshape(2, 3).T)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    labels = b.to_device(np.array([1, 2, 3], dtype=np.int64))
    assert labels.dtype == np.int64
    assert b.to_device([[1.5, 2.0]]).dtype == np.float32
    host = b.to_host(x)
    host[0, 0] = 99  # a copy, as from a device
    assert x[0, 0] == 0
    z = b.zeros((2, 3))
    assert z.dtype == np.float32 and not z.any()
    assert b.zeros((2,), dtype="int32").dtype == np.int32


def test_float32_stays_float32():
    rng = np.random.default_rng(3)
    for case in CASES:
        node, specs = make_node(case.op, case.kw, [case.shapes[i] for i in case.inputs])
        kernel = BACKEND.kernel(case.op)
        leaves = make_leaves(case, rng, np.float32)
        params = make_params(specs, rng, np.float32)
        y, saved = kernel.forward(node, [leaves[i] for i in case.inputs], params, ctx_for(case))
        assert y.dtype == np.float32, case.id
        dxs, dps = kernel.backward(node, saved, np.ones_like(y), params, ctx_for(case))
        assert all(dx.dtype == np.float32 for dx in dxs), case.id
        assert all(v.dtype == np.float32 for v in {**dps, **params}.values()), case.id


def test_dropout_masks_and_scales():
    node, _ = make_node("dropout", dict(rate=0.25), [(8, 16, 16)])
    x = np.ones((4, 8, 16, 16), dtype=np.float32)
    k = BACKEND.kernels["dropout"]
    y, saved = k.forward(node, [x], {}, Ctx(training=True, rng=np.random.default_rng(0)))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02
    (dx,), _ = k.backward(node, saved, x, {}, Ctx(training=True))
    np.testing.assert_array_equal(dx, y)
    y_eval, _ = k.forward(node, [x], {}, Ctx(training=False))
    np.testing.assert_array_equal(y_eval, x)


def test_batchnorm_running_statistics_in_place():
    rng = np.random.default_rng(4)
    node, specs = make_node("batchnorm", dict(momentum=0.2), [(3, 4, 5)])
    params = make_params(specs, rng, np.float32)
    rm, rv = params["running_mean"], params["running_var"]
    rm0, rv0 = rm.copy(), rv.copy()
    x = rng.normal(1.0, 2.0, (6, 3, 4, 5)).astype(np.float32)
    BACKEND.kernels["batchnorm"].forward(node, [x], params, Ctx(training=True))
    assert params["running_mean"] is rm and params["running_var"] is rv
    np.testing.assert_allclose(rm, 0.8 * rm0 + 0.2 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(rv, 0.8 * rv0 + 0.2 * x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    # eval mode reads them and leaves them alone
    y, _ = BACKEND.kernels["batchnorm"].forward(node, [x], params, Ctx(training=False))
    expect = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5) * params["weight"][:, None, None] \
        + params["bias"][:, None, None]
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, 0.8 * rm0 + 0.2 * x.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_registered_entry_point():
    eps = {ep.name: ep for ep in metadata.entry_points(group="cnnc.backends")}
    if "numpy" not in eps:
        pytest.skip("the installed metadata predates the entry point; reinstall the project (pip install -e .)")
    assert eps["numpy"].load() is NumpyBackend


def test_blas_thread_control_round_trips():
    from cnnc.backends.numpy import blas

    before = blas.get_threads()
    if before is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose thread count can be set")
    with blas.threads(1):
        assert blas.get_threads() == 1
        a = np.ones((64, 64), dtype=np.float32)
        assert (a @ a)[0, 0] == 64
    assert blas.get_threads() == before


def test_blas_names_its_kernels_and_the_tuner_key_holds_them():
    """OpenBLAS's kernels for the CPU (OPENBLAS_CORETYPE can choose others, at twice the gemm time)
    are part of the machine the tuner's timings belong to."""
    import os

    from cnnc.backends.numpy import blas, tuner

    if blas.get_threads() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS")
    name = blas.core_name()
    assert name and name != "?"
    if os.environ.get("OPENBLAS_CORETYPE", "").lower() == "haswell":
        assert name == "Haswell"
    assert tuner._machine().endswith(f"-{name}")


def test_backend_threads(monkeypatch):
    from cnnc.backends.numpy import blas, parallel

    before = blas.get_threads(), parallel.get_threads()
    try:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        monkeypatch.setenv("CNNC_NUM_THREADS", "3")
        NumpyBackend()
        assert parallel.get_threads() == 3
        assert blas.get_threads() in (1, None)  # one BLAS thread: the kernels split the batch instead
        monkeypatch.delenv("CNNC_NUM_THREADS")
        NumpyBackend()
        assert parallel.get_threads() == parallel.available_cpus()
        monkeypatch.setenv("CNNC_NUM_THREADS", "many")
        with pytest.raises(CnncError, match="CNNC_NUM_THREADS"):
            NumpyBackend()
    finally:
        if before[0] is not None:
            blas.set_threads(before[0])
        parallel.set_threads(before[1])


THREADED = [  # kernels that split their work over threads: conv by batch, batchnorm by channel
    Case("conv-transposed-dx", "conv", dict(filters=6, kernel=3, pad=1), [(4, 6, 6)]),
    Case("conv-col2im-dx", "conv", dict(filters=8, kernel=3, stride=2, pad=1, round="floor"), [(2, 7, 7)]),
    Case("conv-pointwise", "conv", dict(filters=6, kernel=1, groups=2), [(4, 4, 4)]),
    Case("conv-shifted", "conv", dict(filters=6, kernel=3, pad=(1, 2, 0, 1)), [(16, 6, 6)]),
    Case("conv-winograd", "conv", dict(filters=16, kernel=3, pad=1), [(16, 7, 6)]),
    Case("bn-train", "batchnorm", {}, [(5, 3, 3)]),
    Case("bn-train-2d", "batchnorm", {}, [(7,)]),
    Case("bn-eval", "batchnorm", {}, [(5, 3, 3)], training=False),
    Case("maxpool-pad-ceil", "maxpool", dict(kernel=3, stride=2, pad=1, round="ceil"), [(3, 8, 7)]),
    Case("maxpool-floor-crop", "maxpool", dict(kernel=2, stride=3, round="floor"), [(2, 8, 7)]),
]


# a batch smaller than the thread count splits an im2col conv's filters instead of its images
THREADED_BATCHES = [(c, 5) for c in THREADED] + [(c, b) for c in THREADED[:3] for b in (1, 2)] + [
    (Case("conv-grouped-few-images", "conv", dict(filters=8, kernel=3, groups=2, pad=1), [(4, 5, 5)]), 1)]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case, batch", THREADED_BATCHES, ids=[f"{c.id}-b{b}" for c, b in THREADED_BATCHES])
def test_threaded_kernels_agree(case, batch, threads, monkeypatch):
    """A kernel split over worker threads gives the unsplit result (forward, backward, buffers)."""
    from cnnc.backends.numpy import conv, parallel

    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    monkeypatch.setattr(conv, "MIN_BLOCK", 7)  # many column blocks per thread, ragged last one
    monkeypatch.setattr(conv, "POOL_BLOCK_BYTES", 1)  # one plane a block
    monkeypatch.setattr(conv, "BLOCK_BYTES", 1)
    before = parallel.get_threads()
    rng = np.random.default_rng(9)
    node, specs = make_node(case.op, case.kw, case.shapes)
    kernel = BACKEND.kernel(case.op)
    params = make_params(specs, rng, np.float64)
    x = rng.normal(size=(batch, *case.shapes[0]))
    plain = conv._conv
    by_filters = []  # calls that split the filters over the threads

    def counted(*a, split_filters=False, **kw):
        if split_filters:
            by_filters.append(1)
        return plain(*a, split_filters=split_filters, **kw)
    monkeypatch.setattr(conv, "_conv", counted)
    results = []
    try:
        for t in (1, threads):
            parallel.set_threads(t)
            p = {k: v.copy() for k, v in params.items()}
            y, saved = kernel.forward(node, [x], p, ctx_for(case))
            (dx,), dps = kernel.backward(node, saved, np.cos(y), p, ctx_for(case))
            results.append([y, dx, *(dps[k] for k in sorted(dps)), *(p[k] for k in sorted(p))])
    finally:
        parallel.set_threads(before)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    im2col = case.op == "conv" and conv.algorithms(node, case.shapes[0][0], True)[0] == "im2col"
    assert bool(by_filters) == (im2col and batch < threads)


SHIFTED = [c for c in CASES if c.id.startswith(("conv-shifted", "conv-winograd"))]


@pytest.mark.parametrize("case", SHIFTED, ids=[c.id for c in SHIFTED])
def test_shifted_path_is_the_heuristics_choice(case):
    """The heuristic (what runs untuned) takes the shifted windows for these cases, and Winograd
    for the conv-winograd ones."""
    from cnnc.backends.numpy import conv

    node, _ = make_node(case.op, case.kw, case.shapes)
    first = conv.algorithms(node, case.shapes[0][0], training=True)[0]
    assert first == ("winograd" if case.id.startswith("conv-winograd") else "shifted_stacked")


# every conv case but the depthwise ones (one algorithm, depthwise.py), plus channel counts on either side of STACK_BELOW (the heuristic's "shifted", stacked
# in one direction only) and a 5×5 kernel wider than the map's padding
ALGORITHM_CASES = [c for c in CASES if c.op == "conv" and not c.id.startswith("conv-depthwise")] + [
    Case("conv-64-to-8", "conv", dict(filters=8, kernel=3, pad=1), [(64, 5, 5)]),
    Case("conv-8-to-64-dilated", "conv", dict(filters=64, kernel=3, pad=2, dilation=2), [(8, 6, 5)]),
]


@pytest.mark.parametrize("block", [9, 512], ids=["small-blocks", "one-block"])
@pytest.mark.parametrize("case", ALGORITHM_CASES, ids=[c.id for c in ALGORITHM_CASES])
def test_every_conv_algorithm_equals_im2col(case, block, monkeypatch):
    """Each algorithm the tuner may choose gives im2col's output, input gradient and parameter
    gradients in float64, also when its columns come in many small blocks (im2col's own
    gradients are checked against finite differences above)."""
    from cnnc.backends.numpy import conv

    rng = np.random.default_rng(3)
    node, specs = make_node(case.op, case.kw, case.shapes)
    c = case.shapes[0][0]
    monkeypatch.setattr(conv, "MIN_BLOCK", block)
    monkeypatch.setattr(conv, "BLOCK_BYTES", 1)
    params = make_params(specs, rng, np.float64)
    w, bias = params["weight"], params.get("bias")
    x = rng.normal(size=(3, *case.shapes[0]))
    names = conv.algorithms(node, c, training=True)
    assert "im2col" in names
    results = {}
    for algo in names:
        y, saved = conv._forward(node, algo, x, w, bias)
        tagged = algo != "im2col" or conv._covers_input(node, x.shape)  # ("shifted", …), ("whole", x)
        assert isinstance(saved[0], str) == tagged  # or im2col's arrays
        (dx,), dps = conv._backward(node, saved, np.sin(y), w, bias is not None, True)
        results[algo] = [y, dx, *(dps[k] for k in sorted(dps))]
    for algo, got in results.items():
        for a, b in zip(got, results["im2col"]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=algo)
    if case.id == "conv-64-to-8":
        assert names[0] == "shifted"  # the heuristic's: forward per tap, backward stacked


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "conv"], ids=[c.id for c in CASES if c.op == "conv"])
def test_conv_skips_the_input_gradient_of_the_network_input(case):
    """Backward on the network's input (need_input_grad False) returns None for it and the same
    parameter gradients."""
    rng = np.random.default_rng(5)
    node, specs = make_node(case.op, case.kw, case.shapes)
    kernel = BACKEND.kernels["conv"]
    params = make_params(specs, rng, np.float64)
    x = rng.normal(size=(2, *case.shapes[0]))
    y, saved = kernel.forward(node, [x], params, Ctx(training=True))
    (dx,), full = kernel.backward(node, saved, np.cos(y), params, Ctx(training=True))
    (none,), only = kernel.backward(node, saved, np.cos(y), params, Ctx(training=True, need_input_grad=False))
    assert dx is not None and none is None
    for k in full:
        np.testing.assert_array_equal(full[k], only[k])


def test_stochastic_depth_drops_whole_samples():
    node, _ = make_node("stochastic_depth", dict(rate=0.25), [(2, 3, 3)])
    x = np.ones((4000, 2, 3, 3), dtype=np.float32)
    k = BACKEND.kernels["stochastic_depth"]
    y, saved = k.forward(node, [x], {}, Ctx(training=True, rng=np.random.default_rng(0)))
    per_sample = y.reshape(len(x), -1)
    assert (per_sample == per_sample[:, :1]).all()  # one draw for a sample's whole tensor
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
    (dx,), _ = k.backward(node, saved, x, {}, Ctx(training=True))
    np.testing.assert_array_equal(dx, y)
    y_eval, _ = k.forward(node, [x], {}, Ctx(training=False))
    np.testing.assert_array_equal(y_eval, x)
