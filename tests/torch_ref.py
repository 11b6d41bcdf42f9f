"""Run one of our checked graphs in PyTorch with the same weights: the oracle for whole networks.

Each op maps to torch.nn.functional; the graph's own order and ports drive it, so a mistake in
our executor (ordering, fan-out accumulation) shows up as a difference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cnnc.compiler.graph import inputs_of


def _pad_input(x, pads, value=0.0):
    t, b, l, r = pads
    return F.pad(x, (l, r, t, b), value=value) if any(pads) else x


def _op(op, a, node, xs, p, training):
    x = xs[0] if xs else None
    if op == "conv":
        return F.conv2d(_pad_input(x, node["pads"]), p["weight"], p.get("bias"), a.stride, 0, a.dilation, a.groups)
    if op in ("maxpool", "avgpool"):
        t, b, l, r = node["pads"]
        stride = a.stride or a.kernel
        ceil = a.round == "ceil"
        if t == b and l == r:
            if op == "maxpool":
                return F.max_pool2d(x, a.kernel, stride, (t, l), ceil_mode=ceil)
            return F.avg_pool2d(x, a.kernel, stride, (t, l), ceil_mode=ceil, count_include_pad=a.count_pad)
        value = float("-inf") if op == "maxpool" else 0.0
        xp = _pad_input(x, node["pads"], value)
        return (F.max_pool2d if op == "maxpool" else F.avg_pool2d)(xp, a.kernel, stride, 0, ceil_mode=ceil)
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
    simple = {"relu": F.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
              "identity": lambda v: v, "softmax": lambda v: F.softmax(v, dim=1)}
    if op in simple:
        return simple[op](x)
    if op == "leaky_relu":
        return F.leaky_relu(x, a.slope)
    if op == "lrn":
        return F.local_response_norm(x, a.size, a.alpha, a.beta, a.k)
    if op == "dropout":
        return x  # compared in eval mode or with rate 0
    if op == "add":
        out = xs[0]
        for v in xs[1:]:
            out = out + v
        return out
    if op == "concat":
        return torch.cat(xs, dim=1)
    raise KeyError(op)


def run_torch(graph, params: dict[str, np.ndarray], x: np.ndarray, training: bool = False,
              dtype=torch.float32):
    """Forward through the graph in PyTorch. Returns (output, {qualified name: leaf tensor})."""
    leaves = {k: torch.tensor(np.array(v), dtype=dtype, requires_grad=not k.endswith(("running_mean", "running_var")))
              for k, v in params.items()}
    values = {}
    for n in sorted(graph.nodes):
        d = graph.nodes[n]
        if d["op"] == "input":
            values[n] = torch.tensor(x, dtype=dtype)
            continue
        xs = [values[u] for u in inputs_of(graph, n)]
        p = {spec.name: leaves[f"{d['name']}.{spec.name}"] for spec in d.get("param_specs", [])}
        values[n] = _op(d["op"], d["attrs"], d, xs, p, training)
    return values[graph.graph["output"]], leaves
