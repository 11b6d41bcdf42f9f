"""The NumPy backend against PyTorch, in float32: forward outputs, input and parameter gradients,
BatchNorm running statistics and the losses, with the same inputs and weights.

The op cases are test_numpy_grad.py's (the gradient test checks each backward against its own
forward; this one checks that the forward is PyTorch's), plus a few convolutions at network sizes.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from test_numpy_grad import BACKEND, CASES, Case, ctx_for, make_leaves, make_node, make_params  # noqa: E402

from cnnc.backends.numpy.losses import cross_entropy, mse  # noqa: E402
from cnnc.compiler.ops import OPS, formula_args, torch_elementwise  # noqa: E402
from cnnc.runtime.peers import torch_op  # noqa: E402


class _T:
    torch, F = torch, F

torch.set_num_threads(1)
TOL = 1e-5

LARGE = [
    Case("net-lenet-conv1", "conv", dict(filters=6, kernel=5), [(1, 32, 32)]),
    Case("net-lenet-conv2", "conv", dict(filters=16, kernel=5), [(6, 14, 14)]),
    Case("net-resnet-3x3", "conv", dict(filters=16, kernel=3, pad=1, bias=False), [(16, 16, 16)]),
    Case("net-resnet-down", "conv", dict(filters=32, kernel=3, stride=2, pad=1, bias=False, round="floor"),
         [(16, 16, 16)]),
    Case("net-resnet-proj", "conv", dict(filters=32, kernel=1, stride=2, bias=False, round="floor"), [(16, 16, 16)]),
    Case("net-alexnet-pool", "maxpool", dict(kernel=3, stride=2), [(8, 13, 13)]),
    Case("net-bn", "batchnorm", {}, [(16, 8, 8)]),
]


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def _padded_size(node) -> tuple[int, int]:
    """Rows and columns the windows span (the padded input after floor crops / ceil overhang)."""
    a = node.attrs
    _, oh, ow = node.out_shape
    kh, kw = a.kernel
    sh, sw = getattr(a, "stride", None) or a.kernel
    dh, dw = getattr(a, "dilation", (1, 1))
    return (oh - 1) * sh + dh * (kh - 1) + 1, (ow - 1) * sw + dw * (kw - 1) + 1


def _pad_to(x, node, value=0.0):
    """F.pad to exactly the span the windows use (negative amounts crop)."""
    t, _, l, _ = node.pads
    hp, wp = _padded_size(node)
    return F.pad(x, (l, wp - x.shape[3] - l, t, hp - x.shape[2] - t), value=value)


def torch_forward(node, xs, p, training, dropout_keep=None):
    op, a = node.op, node.attrs
    x = xs[0]
    if op == "conv":
        return F.conv2d(_pad_to(x, node), p["weight"], p.get("bias"), a.stride, 0, a.dilation, a.groups)
    if op in ("maxpool", "avgpool"):
        t, b, l, r = node.pads
        stride = a.stride or a.kernel
        ceil = a.round == "ceil"
        if t == b and l == r:  # PyTorch's own padding and ceil rules
            if op == "maxpool":
                return F.max_pool2d(x, a.kernel, stride, (t, l), ceil_mode=ceil)
            return F.avg_pool2d(x, a.kernel, stride, (t, l), ceil_mode=ceil, count_include_pad=a.count_pad)
        if op == "maxpool":
            return F.max_pool2d(_pad_to(x, node, float("-inf")), a.kernel, stride)
        xp = F.pad(x, (l, r, t, b))
        if a.count_pad:
            return F.avg_pool2d(xp, a.kernel, stride, 0, ceil_mode=ceil)
        # only real elements count: window sums over window counts of a mask of the input
        ones = F.pad(torch.ones_like(x), (l, r, t, b))
        return (F.avg_pool2d(xp, a.kernel, stride, 0, ceil_mode=ceil, divisor_override=1)
                / F.avg_pool2d(ones, a.kernel, stride, 0, ceil_mode=ceil, divisor_override=1))
    if op == "globalavgpool":
        return x.mean(dim=(2, 3), keepdim=True)
    if op == "adaptive_avgpool":
        return F.adaptive_avg_pool2d(x, a.size)
    if op == "dense":
        return F.linear(x.reshape(x.shape[0], -1), p["weight"], p.get("bias"))
    if op == "flatten":
        return x.reshape(x.shape[0], -1)
    if op == "batchnorm":
        return F.batch_norm(x, p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), training,
                            a.momentum, a.eps)
    if op == "lrn":
        return F.local_response_norm(x, a.size, a.alpha, a.beta, a.k)
    if op == "dropout":
        return x if dropout_keep is None else x * dropout_keep / (1 - a.rate)
    if OPS[op].formula is not None:  # the table's PyTorch equivalent of the formula
        return torch_elementwise(_T, op, formula_args(op, a), x)
    if op == "add":
        return sum(xs[1:], xs[0])
    if op == "concat":
        return torch.cat(xs, dim=1)
    if op == "stochastic_depth" and dropout_keep is not None:
        return x * dropout_keep / (1 - a.rate)
    simple = {"identity": lambda v: v, "softmax": lambda v: F.softmax(v, dim=1)}
    if op in simple:
        return simple[op](x)
    return torch_op(op, a, node, xs, p, training)  # every other op: the op table's PyTorch equivalent


@pytest.mark.parametrize("case", CASES + LARGE, ids=[c.id for c in CASES + LARGE])
def test_matches_torch(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    node, specs = make_node(case.op, case.kw, [case.shapes[i] for i in case.inputs])
    kernel = BACKEND.kernel(case.op)
    leaves = make_leaves(case, rng, np.float32)
    params = make_params(specs, rng, np.float32)

    ours_p = {k: v.copy() for k, v in params.items()}
    y, saved = kernel.forward(node, [leaves[i] for i in case.inputs], ours_p, ctx_for(case))
    assert y.dtype == np.float32
    r = rng.normal(size=y.shape).astype(np.float32)
    dxs, dps = kernel.backward(node, saved, r.copy(), ours_p, ctx_for(case))

    t_leaves = [torch.tensor(v, requires_grad=True) for v in leaves]
    t_params = {s.name: torch.tensor(params[s.name], requires_grad=not s.buffer) for s in specs}
    keep = None
    if case.op == "dropout" and case.training:  # PyTorch draws its own mask: reuse ours, check its scale
        keep = torch.tensor((y != 0).astype(np.float32))
        kept = y != 0
        np.testing.assert_allclose(y[kept], leaves[0][kept] / (1 - case.kw["rate"]), rtol=1e-6)
        assert 0 < kept.mean() < 1
    if case.op == "stochastic_depth" and case.training:  # one draw per sample: reuse ours, check its scale
        kept = (y.reshape(y.shape[0], -1) != 0).any(axis=1)
        keep = torch.tensor(kept.astype(np.float32).reshape((-1,) + (1,) * (y.ndim - 1)))
        np.testing.assert_allclose(y[kept], leaves[0][kept] / (1 - case.kw["rate"]), rtol=1e-6)
        assert not y[~kept].any()
    ref = torch_forward(node, [t_leaves[i] for i in case.inputs], t_params, case.training, keep)
    (ref * torch.tensor(r)).sum().backward()

    assert y.shape == tuple(ref.shape)
    assert rel(y, ref.detach().numpy()) <= TOL, "forward"
    for leaf, t in enumerate(t_leaves):
        ours = sum(dx for dx, i in zip(dxs, case.inputs) if i == leaf)
        assert ours.dtype == np.float32
        err = rel(ours, t.grad.numpy())
        assert err <= TOL, f"input {leaf}: relative error {err:.2e}"
    for s in specs:
        if s.buffer:  # running statistics moved as PyTorch's (training) or not at all (eval)
            err = rel(ours_p[s.name], t_params[s.name].detach().numpy())
            assert err <= TOL, f"{s.name}: relative error {err:.2e}"
        else:
            assert dps[s.name].dtype == np.float32
            err = rel(dps[s.name], t_params[s.name].grad.numpy())
            assert err <= TOL, f"{s.name}: relative error {err:.2e}"


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch(smoothing):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (16, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    loss, grad = BACKEND.loss("cross_entropy")(logits, labels, label_smoothing=smoothing)
    t = torch.tensor(logits, requires_grad=True)
    ref = F.cross_entropy(t, torch.tensor(labels), label_smoothing=smoothing)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=TOL)
    assert grad.dtype == np.float32
    assert rel(grad, t.grad.numpy()) <= TOL


def test_mse_matches_torch():
    rng = np.random.default_rng(6)
    pred = rng.normal(size=(8, 3, 2, 2)).astype(np.float32)
    target = rng.normal(size=(8, 3, 2, 2)).astype(np.float32)
    loss, grad = mse(pred, target)
    t = torch.tensor(pred, requires_grad=True)
    ref = F.mse_loss(t, torch.tensor(target))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=TOL)
    assert grad.dtype == np.float32
    assert rel(grad, t.grad.numpy()) <= TOL


def test_cross_entropy_large_logits_match_torch():
    logits = np.array([[80.0, -80.0, 0.0], [0.0, 300.0, -300.0]], dtype=np.float32)
    labels = np.array([1, 2])
    loss, grad = cross_entropy(logits, labels)
    t = torch.tensor(logits, requires_grad=True)
    ref = F.cross_entropy(t, torch.tensor(labels))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=TOL)
    assert rel(grad, t.grad.numpy()) <= TOL


@pytest.mark.parametrize("kw", [dict(kernel=2), dict(kernel=3, stride=1, pad=1), dict(kernel=3, stride=2, round="ceil")],
                         ids=["2x2", "3s1p1", "3s2-ceil"])
def test_maxpool_ties_go_to_the_first_maximum(kw):
    rng = np.random.default_rng(8)
    x = rng.integers(0, 3, (2, 3, 8, 8)).astype(np.float32)  # many equal maxima in each window
    node, _ = make_node("maxpool", kw, [(3, 8, 8)])
    k = BACKEND.kernels["maxpool"]
    y, saved = k.forward(node, [x], {}, ctx_for(CASES[0]))
    r = rng.normal(size=y.shape).astype(np.float32)
    (dx,), _ = k.backward(node, saved, r, {}, ctx_for(CASES[0]))
    t = torch.tensor(x, requires_grad=True)
    ref = torch_forward(node, [t], {}, True)
    (ref * torch.tensor(r)).sum().backward()
    np.testing.assert_array_equal(y, ref.detach().numpy())
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-6, atol=1e-6)
