"""ONNX equivalents as plain descriptions: the nodes and initializers each op of a graph becomes.

The op table's `onnx_export` entries (compiler/ops.py) are rules that call an `OnnxEmitter`,
which records `OnnxNode` descriptions (op type, input and output names, attributes as Python
values) and initializers (NumPy arrays); runtime/onnx_export.py renders them with onnx.helper,
so nothing here imports onnx. An element-wise op uses its `OnnxAct` operator where the opset
has it, and otherwise its formula rendered node by node (`OnnxEmitter.formula`): silu, which
ONNX lacks, and gelu below opset 20 still export exactly what the backends compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnc.dsl.errors import CnncError

from .formula import Expr
from .ops import OPS, OnnxAct, formula_args

# ONNX TensorProto element types, for Cast
FLOAT, INT64, BOOL = 1, 7, 9
INT64_MAX = np.iinfo(np.int64).max  # Slice's "to the end"

_CALLS = {"exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh", "erf": "Erf", "abs": "Abs",
          "sigmoid": "Sigmoid", "softplus": "Softplus", "min": "Min", "max": "Max"}
_BINARY = {"+": "Add", "-": "Sub", "*": "Mul", "/": "Div"}
_COMPARE = {">": "Greater", "<": "Less", ">=": "GreaterOrEqual", "<=": "LessOrEqual"}


@dataclass
class OnnxNode:
    """One ONNX node: `attrs` holds ints, floats, strings and lists of them."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)


class OnnxEmitter:
    """Collects the ONNX nodes and initializers of a graph, one of our nodes at a time.

    `begin(name, params)` starts a node: its parameters (host arrays by parameter name) become
    initializers named `name.param`, and the values it creates are named `name/...`."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[OnnxNode] = []
        self.initializers: dict[str, np.ndarray] = {}
        self._scope = ""
        self._params: dict[str, np.ndarray] = {}
        self._k = 0

    def begin(self, name: str, params: dict[str, np.ndarray]) -> None:
        self._scope, self._params, self._k = name, params, 0

    def _fresh(self, what: str) -> str:
        self._k += 1
        return f"{self._scope}/{what}_{self._k}"

    def node(self, op_type: str, inputs: list[str], **attrs) -> str:
        """Add a node with one output; returns the output's name."""
        out = self._fresh(op_type)
        self.nodes.append(OnnxNode(op_type, list(inputs), [out], f"{self._scope}/{op_type}_{self._k}", attrs))
        return out

    def param(self, name: str, shape: tuple[int, ...] | None = None) -> str:
        """The initializer of the current node's parameter `name`, reshaped to `shape` if given."""
        value = np.asarray(self._params[name], dtype=np.float32)
        qualified = f"{self._scope}.{name}"
        self.initializers[qualified] = value if shape is None else value.reshape(shape)
        return qualified

    def const(self, value, dtype=np.float32) -> str:
        """An initializer holding `value` (a scalar or an array)."""
        name = self._fresh("const")
        self.initializers[name] = np.asarray(value, dtype=dtype)
        return name

    def ints(self, values) -> str:
        """A 1-D int64 initializer: shapes, axes, pads, slice bounds."""
        return self.const(list(values), np.int64)

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        """ReduceMean keeping dims; its axes moved from an attribute to an input in opset 18."""
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.ints(axes)], keepdims=1)
        return self.node("ReduceMean", [x], axes=list(axes), keepdims=1)

    # ---- element-wise ops ------------------------------------------------------------------

    def act(self, op: str, args: tuple[float, ...], x: str) -> str:
        """The element-wise op `op` of the table on x, with its formula's arguments."""
        d = OPS[op]
        spec = d.onnx_export
        params = dict(zip(d.formula.params, args))
        if isinstance(spec, OnnxAct) and self.opset >= spec.since:
            attrs = {**spec.attrs, **{k: float(params[p]) for k, p in spec.from_params.items()}}
            return self.node(spec.op_type, [x] + [self.const(c) for c in spec.consts], **attrs)
        return self.formula(d.formula.fwd, x, params)

    def formula(self, e: Expr, x: str, params: dict[str, float]) -> str:
        """A formula tree as ONNX nodes over the float tensor x, in the tree's order of operations."""
        if e.kind == "num":
            return self.const(e.value)
        if e.kind == "var":
            return x if e.name == "x" else self.const(params[e.name])
        if e.kind == "neg":
            return self.node("Neg", [self.formula(e.args[0], x, params)])
        if e.kind == "bin":
            a, b = (self.formula(v, x, params) for v in e.args)
            return self.node(_BINARY[e.name], [a, b])
        if e.kind == "cmp":  # 1 where true, 0 elsewhere
            return self.node("Cast", [self._condition(e, x, params)], to=FLOAT)
        name, args = e.name, e.args
        if name == "where":
            cond = self._condition(args[0], x, params)
            return self.node("Where", [cond] + [self.formula(v, x, params) for v in args[1:]])
        vals = [self.formula(v, x, params) for v in args]
        if name == "clip":  # Clip takes scalar bounds; others are a max and a min
            if args[1].kind == "num" and args[2].kind == "num":
                return self.node("Clip", vals)
            return self.node("Min", [self.node("Max", vals[:2]), vals[2]])
        if name == "expm1":
            return self.node("Sub", [self.node("Exp", vals), self.const(1.0)])
        if name == "log1p":
            return self.node("Log", [self.node("Add", [vals[0], self.const(1.0)])])
        return self.node(_CALLS[name], vals)

    def _condition(self, e: Expr, x: str, params: dict[str, float]) -> str:
        """A boolean tensor: a comparison, or any other value's being non-zero."""
        if e.kind == "cmp":
            a, b = (self.formula(v, x, params) for v in e.args)
            return self.node(_COMPARE[e.name], [a, b])
        return self.node("Cast", [self.formula(e, x, params)], to=BOOL)


def emit(E: OnnxEmitter, op: str, attrs, node: dict, xs: list[str]) -> str:
    """One of our nodes as ONNX: its op's `onnx_export` rule, or for an element-wise op its
    operator or formula. Returns the name of the value holding its result."""
    d = OPS[op]
    if callable(d.onnx_export):
        return d.onnx_export(E, attrs, node, xs)
    if d.formula is not None:
        return E.act(op, formula_args(op, attrs), xs[0])
    raise CnncError(f"`{node['name']}`: op {op} has no ONNX equivalent in cnnc")
