"""The same network in another framework, for `cnnc bench --vs`: PyTorch built from our graph.

PyTorch is optional (`pip install torch`); it is imported only here, only when asked for. The
graph's own order and ports drive the PyTorch version, and it gets our weights, so both sides
compute the same function on the same batch.
"""

from __future__ import annotations

import numpy as np

from cnnc.compiler.graph import inputs_of
from cnnc.dsl.errors import CnncError


def _torch():
    try:
        import torch
    except ImportError:
        raise CnncError("`--vs torch` needs PyTorch", hint="pip install torch") from None
    return torch


def _pad_input(F, x, pads, value=0.0):
    t, b, l, r = pads
    return F.pad(x, (l, r, t, b), value=value) if any(pads) else x


def torch_op(op, a, node, xs, p, training):
    """One op of the table in PyTorch (functional form)."""
    torch = _torch()
    import torch.nn.functional as F
    x = xs[0] if xs else None
    if op in ("conv", "fused_conv"):
        y = F.conv2d(_pad_input(F, x, node["pads"]), p["weight"], p.get("bias"), a.stride, 0, a.dilation, a.groups)
        if op == "fused_conv":
            if a.residual:
                y = y + xs[1]
            y = _activation(F, torch, y, a.activation, a.slope)
        return y
    if op in ("maxpool", "avgpool"):
        t, b, l, r = node["pads"]
        stride = a.stride or a.kernel
        ceil = a.round == "ceil"
        if t == b and l == r:
            if op == "maxpool":
                return F.max_pool2d(x, a.kernel, stride, (t, l), ceil_mode=ceil)
            return F.avg_pool2d(x, a.kernel, stride, (t, l), ceil_mode=ceil, count_include_pad=a.count_pad)
        value = float("-inf") if op == "maxpool" else 0.0
        return (F.max_pool2d if op == "maxpool" else F.avg_pool2d)(_pad_input(F, x, node["pads"], value), a.kernel,
                                                                     stride, 0, ceil_mode=ceil)
    if op == "globalavgpool":
        return x.mean(dim=(2, 3), keepdim=True)
    if op == "adaptive_avgpool":
        return F.adaptive_avg_pool2d(x, a.size)
    if op in ("dense", "fused_dense"):
        y = F.linear(x.reshape(x.shape[0], -1), p["weight"], p.get("bias"))
        return _activation(F, torch, y, a.activation, a.slope) if op == "fused_dense" else y
    if op == "flatten":
        return x.reshape(x.shape[0], -1)
    if op == "batchnorm":
        return F.batch_norm(x, p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"), training,
                            a.momentum, a.eps)
    if op in ("relu", "relu6", "sigmoid", "tanh", "leaky_relu"):
        return _activation(F, torch, x, op, getattr(a, "slope", 0.01))
    if op == "elemwise_chain":
        for name, slope in zip(a.ops, a.slopes):
            x = _activation(F, torch, x, name, slope)
        return x
    if op == "identity":
        return x
    if op == "softmax":
        return F.softmax(x, dim=1)
    if op == "lrn":
        return F.local_response_norm(x, a.size, a.alpha, a.beta, a.k)
    if op == "dropout":
        return F.dropout(x, a.rate, training)
    if op == "add":
        out = xs[0]
        for v in xs[1:]:
            out = out + v
        return out
    if op == "concat":
        return torch.cat(xs, dim=1)
    if op == "layout_transform":
        return x
    raise CnncError(f"no PyTorch equivalent for op `{op}`")


def _activation(F, torch, y, name, slope):
    if name in ("none", None):
        return y
    return {"relu": F.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
            "leaky_relu": lambda v: F.leaky_relu(v, slope)}[name](y)


class TorchNetwork:
    """Our graph as a PyTorch computation, holding tensors made from our parameters."""

    def __init__(self, graph, params: dict[str, np.ndarray], device: str = "cpu"):
        torch = _torch()
        self.torch = torch
        self.graph = graph
        self.leaves = {k: torch.tensor(np.array(v), dtype=torch.float32, device=device,
                                       requires_grad=not k.endswith(("running_mean", "running_var")))
                       for k, v in params.items()}

    def parameters(self):
        return [v for v in self.leaves.values() if v.requires_grad]

    def __call__(self, x, training: bool = False):
        g = self.graph
        values = {}
        for n in sorted(g.nodes):
            d = g.nodes[n]
            if d["op"] == "input":
                values[n] = x
                continue
            p = {spec.name: self.leaves[f"{d['name']}.{spec.name}"] for spec in d.get("param_specs", [])}
            values[n] = torch_op(d["op"], d["attrs"], d, [values[u] for u in inputs_of(g, n)], p, training)
        return values[g.graph["output"]]
