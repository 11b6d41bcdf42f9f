"""The same network in another framework, for `cnnc bench --vs`: PyTorch built from our graph,
or onnxruntime running our ONNX export.

PyTorch is optional (`pip install torch`), onnxruntime the extra `[onnx]`; each is imported only
here, only when asked for. The graph's own order and ports drive the PyTorch version, and it gets
our weights; the ONNX export carries them too; so both sides compute the same function on the
same batch.
"""

from __future__ import annotations

import numpy as np

from cnnc.compiler.graph import inputs_of
from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import CnncError


def _torch():
    try:
        import torch
    except ImportError:
        raise CnncError("`--vs torch` needs PyTorch", hint="pip install torch") from None
    return torch


class _T:
    """The modules the op table's PyTorch equivalents are written in."""

    def __init__(self, torch):
        import torch.nn.functional as F
        self.torch, self.F = torch, F


def torch_op(op, a, node, xs, p, training):
    """One op of the table in PyTorch, as the table's `torch` entry gives it: an expression in
    F, torch, x (the first input), xs, p (parameters), a (attributes), training and the
    attributes by name, or a function of (T, a, node, xs, p, training)."""
    rule = OPS[op].torch
    if rule is None:
        raise CnncError(f"no PyTorch equivalent for op `{op}`")
    T = _T(_torch())
    if callable(rule):
        return rule(T, a, node, xs, p, training)
    names = {"torch": T.torch, "F": T.F, "x": xs[0] if xs else None, "xs": xs, "p": p, "a": a, "training": training,
             **a.model_dump()}
    return eval(rule, {"__builtins__": {}}, names)  # noqa: S307 — the op table's own expressions


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
            if n == g.graph["input"]:
                values[n] = x
                continue
            p = {spec.name: self.leaves[f"{d['name']}.{spec.name}"] for spec in d.get("param_specs", [])}
            values[n] = torch_op(d["op"], d["attrs"], d, [values[u] for u in inputs_of(g, n)], p, training)
        return values[g.graph["output"]]


def onnxruntime_session(model, threads: int):
    """The network exported to ONNX in memory (as written, -O0: onnxruntime folds and fuses by
    itself) in an onnxruntime CPU session with `threads` intra-op threads; (session, export)."""
    from .onnx_export import export_model, session
    exported = export_model(model, 0)
    return session(exported, threads), exported
