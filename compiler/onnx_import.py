"""The ONNX front end: an ONNX model → cnnc's graph IR (compiler/graph.py) and its weights.

`load_onnx(path)` reads a `.onnx` file, `import_model(model, name)` converts a ModelProto: one
N×C×H×W (or N×F) input, whose first dimension is the batch; graph inputs that have initializers
are weights. Each ONNX node becomes an op of the table (compiler/ops.py), chosen by op type and
opset, or is folded away:
- constant chains (Constant, Shape, Gather, Unsqueeze, Squeeze, Concat, Reshape, Slice, Cast,
  ConstantOfShape and arithmetic on constants) are evaluated here; Shape gives the batch as a
  symbol, so PyTorch's `x.view(x.size(0), -1)` (Shape → Gather → Unsqueeze → Concat → Reshape)
  becomes `flatten`;
- Dropout and Identity vanish, Pad before a Conv or AveragePool moves into its pads, Mul(x,
  Sigmoid(x)) is silu, Reshape → Transpose → Reshape of ShuffleNet is channel_shuffle, a
  per-channel Add of constants after a Conv, Gemm or BatchNormalization folds into its bias and a
  Mul into a BatchNormalization's scale (Caffe2's Scale layers; elsewhere a Mul is layer_scale),
  Gemm's alpha, beta and transposes fold into dense weights;
- an activation spelled out in element-wise operators (GELU as Div, Erf, Add, Mul below opset 20;
  mish as Softplus, Tanh, Mul) becomes the op of the table whose formula it computes, found by
  evaluating both at probe points; Slice of channels is channel_slice, a strided Slice and a
  channel Pad pad_channels, Transpose → LayerNormalization → Transpose layernorm.
Opset 6's broadcast=1/axis arithmetic is read as NumPy broadcasting.
Every node gets a span into a synthetic source, one line per ONNX node under the file's name,
so that an error names the file, the line of the node listing and the node. Ops cnnc lacks are
reported all at once. The result is a built graph, not yet shape-checked: pipeline.check runs
the front end's remaining passes on it; the weights travel in g.graph["weights"] (qualified
names `node.param`, as runtime/model.py uses).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import networkx as nx
import numpy as np
from pydantic import ValidationError

from cnnc.dsl.errors import CnncError, Diagnostics, Source, Span

from .ops import OPS, fmt_shape

INSTALL_HINT = "pip install 'cnnc[onnx]'"
MIN_OPSET = 6


def onnx_module():
    """The onnx package, or a CnncError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise CnncError("reading ONNX models needs the onnx package", hint=INSTALL_HINT) from None
    return onnx


class _Batch:
    """The batch dimension in constant shape arithmetic (what Shape gives for dimension 0)."""

    def __repr__(self) -> str:
        return "N"


BATCH = _Batch()


@dataclass
class Tensor:
    """A value a cnnc node computes: the node id and its shape without the batch."""

    node: int
    shape: tuple[int, ...]


@dataclass
class Padded:
    """Pad's output, waiting for the Conv or pool that takes its pads (t, b, l, r)."""

    src: Tensor
    pads: tuple[int, int, int, int]
    value: float
    span: Span


@dataclass
class Grouped:
    """ShuffleNet's Reshape to N×g×(C/g)×H×W (swapped: after Transpose 0 2 1 3 4)."""

    src: Tensor
    groups: int
    swapped: bool = False


@dataclass
class GroupView:
    """A tensor reshaped to N×g×(the rest), waiting for InstanceNormalization over each group and
    the reshape back: group normalisation as exporters write it (`eps` once normalised)."""

    src: Tensor
    groups: int
    eps: float | None = None


@dataclass
class Nhwc:
    """An image transposed to N×H×W×C (Transpose 0 2 3 1), waiting for a LayerNormalization over
    its last axis and the transpose back (ConvNeXt's LayerNorm2d); `normalized` once it had it."""

    src: Tensor
    normalized: bool = False


@dataclass
class Expression:
    """An element-wise function of one tensor spelled out in ONNX operators (GELU as Mul, Erf, Add,
    Mul, Mul), kept as a NumPy function until a node that is not element-wise reads it; then it
    becomes the op of the table whose formula it computes (compiler/formula.py), found by probing."""

    src: Tensor
    fn: Callable[[np.ndarray], np.ndarray]
    node: Any  # the ONNX node that computed it last, and its index: names and locates the result
    index: int
    resolved: Tensor | None = None
    match: str | None = field(default=None, init=False)
    matched: bool = field(default=False, init=False)

    def complete(self) -> bool:
        """Whether it computes an activation of the table as it stands."""
        if not self.matched:
            self.match, self.matched = _matching_op(self.fn), True
        return self.match is not None


class _Skip(Exception):
    """A node whose input already failed: nothing more to report about it."""


def load_onnx(path: str | os.PathLike) -> nx.MultiDiGraph:
    """The built graph of a `.onnx` file with its weights in g.graph["weights"]."""
    onnx = onnx_module()
    p = Path(path)
    if not p.exists():
        raise CnncError(f"file not found: {p}")
    if not p.is_file():
        raise CnncError(f"{p} is not a file, not an ONNX model")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CnncError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        from google.protobuf.message import DecodeError
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CnncError(f"{p} is not an ONNX model: it does not parse as an ONNX protobuf ({exc})",
                        hint="give a .onnx file written by torch.onnx.export, cnnc export or another exporter") \
            from None
    if not model.graph.node and not model.graph.input:
        raise CnncError(f"{p} is not an ONNX model: it holds no graph",
                        hint="give a .onnx file written by torch.onnx.export, cnnc export or another exporter")
    if any(t.data_location == 1 for t in model.graph.initializer):  # EXTERNAL
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as exc:
            raise CnncError(f"{p}: its weights live in external files that cannot be read ({exc})") from None
    return import_model(model, str(p))


def import_model(model, name: str) -> nx.MultiDiGraph:
    """An ONNX ModelProto → cnnc's built graph (weights in g.graph["weights"]); `name` names it in errors."""
    return _Importer(model, name).run()


def _sanitize(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", text).strip("_")
    s = re.sub(r"_+", "_", s)
    if not s or not (s[0].isalpha() or s[0] == "_"):
        s = "n" + s
    return s


def _listing_line(onnx, node) -> str:
    text = onnx.helper.printable_node(node)
    return text.replace("\n", " ")


class _Importer:
    def __init__(self, model, name: str):
        self.onnx = onnx_module()
        self.model = model
        self.file = name
        self.opset = self._opset()
        self.graph = model.graph
        self.diags = Diagnostics()
        self.g = nx.MultiDiGraph()
        self.values: dict[str, Any] = {}
        self.weights: dict[int, dict[str, np.ndarray]] = {}
        self.names: set[str] = set()
        self.node_uses: dict[int, int] = {}
        self.uses: dict[str, int] = {}
        self.readers: dict[str, list[str]] = {}  # value name → op types of the nodes reading it
        for node in self.graph.node:
            for v in node.input:
                if v:
                    self.uses[v] = self.uses.get(v, 0) + 1
                    self.readers.setdefault(v, []).append(node.op_type)
        for o in self.graph.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1
        header = f"graph {self.graph.name or Path(name).stem}: opset {self.opset}"
        lines = [header] + [_listing_line(self.onnx, n) for n in self.graph.node]
        self.source = Source(name, "\n".join(lines) + "\n")
        self.header_span = Span(self.source, 1, 1, 1, len(header) + 1)

    def _opset(self) -> int:
        versions = [o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        if not versions:
            version = 1
        else:
            version = max(versions)
        if version < MIN_OPSET:
            raise CnncError(f"{self.file}: ONNX opset {version}; cnnc reads opsets {MIN_OPSET} and up",
                            hint="re-export the model with a newer opset (onnx.version_converter can convert it)")
        return version

    def span(self, i: int) -> Span:
        line = self.source.line_text(i + 2)
        return Span(self.source, i + 2, 1, i + 2, len(line) + 1)

    # ---- entry
    def run(self) -> nx.MultiDiGraph:
        self.unsupported()
        inits = {t.name: t for t in self.graph.initializer}
        for name, t in inits.items():
            self.values[name] = self.onnx.numpy_helper.to_array(t)
        inputs = [i for i in self.graph.input if i.name not in inits]
        if len(inputs) != 1:
            listed = ", ".join(f"`{i.name}`" for i in inputs) or "none"
            raise CnncError(f"{self.file}: the model has {len(inputs)} inputs ({listed}); cnnc networks take one "
                            "image or feature batch", self.header_span,
                            "give the other inputs as initializers (weights), or export a single-input model")
        self.make_input(inputs[0])
        for i, node in enumerate(self.graph.node):
            try:
                self.convert(i, node)
            except _Skip:
                for o in node.output:
                    self.values[o] = None
            except CnncError as err:
                if err.span is None:
                    err.span = self.span(i)
                self.diags.add(err)
                for o in node.output:
                    self.values[o] = None
        self.diags.check()
        return self.finish()

    def unsupported(self) -> None:
        """Every node of an op type cnnc cannot read, all at once."""
        for i, node in enumerate(self.graph.node):
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            known = node.op_type in HANDLERS or node.op_type in FOLDS or node.op_type in _UNARY or \
                node.op_type in _BINARY
            if domain or not known:
                where = f"domain `{domain}`, " if domain else ""
                self.diags.add(CnncError(
                    f"ONNX node `{node.name or node.output[0]}`: cnnc has no equivalent of {node.op_type} "
                    f"({where}opset {self.opset})", self.span(i),
                    "cnnc reads the CNN operators listed by `cnnc ops` (their ONNX equivalents)"))
        self.diags.check()

    def make_input(self, vi) -> None:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or t.elem_type not in (1, 10, 11, 16):
            raise CnncError(f"{self.file}: input `{vi.name}` is not a floating-point tensor", self.header_span)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) not in (2, 4) or any(d is None or d < 1 for d in dims[1:]):
            shown = "×".join("?" if d is None else str(d) for d in dims)
            raise CnncError(f"{self.file}: input `{vi.name}` has shape {shown or 'unknown'}; cnnc takes N×C×H×W "
                            "images or N×F features with known sizes after the batch", self.header_span)
        self.batch = dims[0]
        shape = tuple(dims[1:])
        n = self.add("input", OPS["input"].attrs(dims=shape), [], vi.name, self.header_span)
        self.values[vi.name] = Tensor(n, shape)
        self.g.graph["input"] = n
        self.bind(vi.name, Tensor(n, shape))

    # ---- nodes
    def add(self, op: str, attrs, inputs: list[Tensor], name: str, span: Span,
            params: dict[str, np.ndarray] | None = None) -> int:
        base = _sanitize(name)
        full, k = base, 1
        while full in self.names:
            k += 1
            full = f"{base}_{k}"
        self.names.add(full)
        n = self.g.number_of_nodes()
        self.g.add_node(n, op=op, attrs=attrs, name=full, local_name=full, span=span, callstack=(), path=())
        for port, t in enumerate(inputs):
            self.g.add_edge(t.node, n, port=port)
        if params:
            self.weights[n] = {k: np.asarray(v, np.float32) for k, v in params.items()}
        self.node_uses.setdefault(n, 0)
        return n

    def layer(self, op: str, attrs: dict, inputs: list[Tensor], node, i: int,
              params: dict[str, np.ndarray] | None = None) -> Tensor:
        """Add a node of op `op`, its shape by the op table's rule, and bind the node's first output."""
        try:
            a = OPS[op].attrs(**attrs)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise self.refuse(node, f"with {op} {field} = {err.get('input')!r}: {err['msg']}") from None
        shape = tuple(OPS[op].shape(a, [t.shape for t in inputs]))
        n = self.add(op, a, inputs, node.name or node.output[0], self.span(i), params)
        t = Tensor(n, shape)
        self.bind(node.output[0], t)
        if params:
            specs = {s.name: s.shape for s in OPS[op].params(a, [x.shape for x in inputs])}
            for k, v in self.weights[n].items():
                if tuple(specs.get(k, ())) != tuple(v.shape):
                    raise CnncError(f"ONNX node `{node.name or node.output[0]}` ({node.op_type}): its {k} has "
                                    f"shape {fmt_shape(v.shape)}, {op} needs {fmt_shape(specs.get(k, ()))}")
        return t

    def bind(self, name: str, value: Any) -> None:
        self.values[name] = value
        if isinstance(value, Tensor):
            self.node_uses[value.node] = self.node_uses.get(value.node, 0) + self.uses.get(name, 0)

    def alias(self, node, value: Any) -> None:
        """The node's output is its input (Identity, Dropout at inference)."""
        if isinstance(value, Tensor):
            self.node_uses[value.node] -= 1
        self.bind(node.output[0], value)

    def convert(self, i: int, node) -> None:
        ins = []
        for v in node.input:
            if not v:
                ins.append(None)
                continue
            if v not in self.values:
                raise CnncError(f"ONNX node `{node.name or node.output[0]}` reads `{v}`, which no node or "
                                "initializer before it defines")
            if self.values[v] is None:
                raise _Skip()
            ins.append(self.values[v])
        attrs = {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: _attr_value(v) for k, v in attrs.items()}
        if self.opset < 7 and node.op_type in _BINARY and attrs.pop("broadcast", 0):
            ins = _legacy_broadcast(ins, attrs.pop("axis", None))
        expr = _expression_step(self, node, i, ins, attrs)
        if expr is not None:
            self.values[node.output[0]] = expr
            return
        ins = [self.resolve(v, v.node.output[0]) if isinstance(v, Expression) else v for v in ins]
        consts = all(x is None or isinstance(x, np.ndarray) for x in ins)
        if node.op_type in FOLDS and (consts or node.op_type == "Shape"):
            if ins and isinstance(ins[0], Tensor):  # Shape reads only the size, not the values
                self.node_uses[ins[0].node] -= 1
            try:
                out = FOLDS[node.op_type](self, ins, attrs)
            except CnncError as err:
                raise self.refuse(node, f"here: {err.message}") from None
            except (ValueError, IndexError, TypeError, KeyError) as exc:
                raise self.refuse(node, f"on these constants ({exc})") from None
            for name, value in zip(node.output, out if isinstance(out, tuple) else (out,)):
                self.values[name] = np.asarray(value)  # numpy's 0-d results are scalars
            return
        if node.op_type not in HANDLERS:
            raise self.refuse(node, "of values computed from the input")
        used = [o for o in node.output[1:] if o and self.uses.get(o)]
        if used:
            raise self.refuse(node, f"with its extra output `{used[0]}` in use")
        HANDLERS[node.op_type](self, node, i, ins, attrs)

    def resolve(self, e: Expression, name: str) -> Tensor:
        """The table op an element-wise expression computes, as a node (once per expression)."""
        if e.resolved is not None:
            return e.resolved
        op = e.match if e.complete() else None
        node, i = e.node, e.index
        if op is None:
            scale, shift = _affine_of(e.fn)
            if scale is None:
                raise CnncError(f"ONNX node `{node.name or node.output[0]}` ({node.op_type}, opset {self.opset}) "
                                "ends an element-wise expression that is none of cnnc's activations",
                                self.span(i), "`cnnc ops` lists the activations and their formulas")
            c = e.src.shape[0]
            before = self.values.get(node.output[0])
            _affine(self, node, i, e.src, None if scale == 1.0 else np.full(c, scale),
                    None if shift == 0.0 else np.full(c, shift))
            e.resolved = self.values[node.output[0]]
            self.values[node.output[0]] = before
            return e.resolved
        a = OPS[op].attrs()
        n = self.add(op, a, [e.src], node.name or node.output[0], self.span(i))
        e.resolved = Tensor(n, tuple(OPS[op].shape(a, [e.src.shape])))
        self.node_uses[n] = self.uses.get(name, 0)
        return e.resolved

    def refuse(self, node, why: str, hint: str | None = None) -> CnncError:
        return CnncError(f"ONNX node `{node.name or node.output[0]}` ({node.op_type}, opset {self.opset}): "
                         f"cnnc cannot express {node.op_type} {why}", hint=hint)

    def tensor(self, node, x, what: str = "its input") -> Tensor:
        if isinstance(x, Tensor):
            return x
        if isinstance(x, Padded):
            raise self.refuse(node, "after a Pad", "cnnc takes Pad only right before a Conv or AveragePool")
        raise self.refuse(node, f"on {what} of this kind")

    def const(self, node, x, what: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise self.refuse(node, f"with {what} computed from the input", f"cnnc needs {what} as a constant")
        if x.dtype == object:
            raise self.refuse(node, f"with {what} depending on the batch size")
        return x

    def foldable(self, t: Tensor) -> bool:
        """t's node feeds only the node being converted, so its weights may absorb that node."""
        return t.node != self.g.graph["input"] and self.node_uses.get(t.node) == 1 and t.node in self.weights

    # ---- the end
    def finish(self) -> nx.MultiDiGraph:
        outs = [o.name for o in self.graph.output]
        if len(outs) != 1:
            raise CnncError(f"{self.file}: the model has {len(outs)} outputs; cnnc networks have one",
                            self.header_span)
        out = self.values.get(outs[0])
        if isinstance(out, Expression):
            out = self.resolve(out, outs[0])
        if not isinstance(out, Tensor):
            raise CnncError(f"{self.file}: the output `{outs[0]}` is not computed from the input", self.header_span)
        g = self.g
        live = nx.ancestors(g, out.node) | {out.node}
        order = sorted(live)
        relabel = {old: new for new, old in enumerate(order)}
        h = nx.relabel_nodes(g.subgraph(order).copy(), relabel)
        result = nx.MultiDiGraph()
        for n in sorted(h.nodes):
            result.add_node(n, **h.nodes[n])
        for u, v, d in h.edges(data=True):
            result.add_edge(u, v, **d)
        weights = {}
        for old in order:
            name = g.nodes[old]["name"]
            for k, v in self.weights.get(old, {}).items():
                weights[f"{name}.{k}"] = v
        stem = Path(self.file).stem
        result.graph.update(network=_sanitize(stem), source=self.source, blocks={}, classes=None, train=None,
                            input=relabel[g.graph["input"]], output=relabel[out.node], weights=weights,
                            onnx={"opset": self.opset, "producer": self.model.producer_name,
                                  "ir_version": self.model.ir_version})
        return result


# ---- helpers ---------------------------------------------------------------------------------

def _attr_value(v):
    """An attribute as Python: strings decoded, float32 numbers at their shortest (0.9, not 0.8999999761)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, float):
        return float(str(np.float32(v)))
    if isinstance(v, list):
        return [_attr_value(x) for x in v]
    return v


def _ints(v) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _window_pads(imp: _Importer, node, attrs, in_hw, kernel, stride, dilation=(1, 1)) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from ONNX's pads [h_begin, w_begin, h_end, w_end] or auto_pad."""
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = _ints(attrs.get("pads", (0, 0, 0, 0)))
        if len(p) != 4:
            raise imp.refuse(node, f"with pads {list(p)} (cnnc has 2-D windows only)")
        if min(p) < 0:
            raise imp.refuse(node, f"with negative pads {list(p)}")
        return (p[0], p[2], p[1], p[3])
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise imp.refuse(node, f"with auto_pad {auto}")
    out = []
    for n, k, s, d in zip(in_hw, kernel, stride, dilation):
        eff = d * (k - 1) + 1
        total = max((math.ceil(n / s) - 1) * s + eff - n, 0)
        small, big = total // 2, total - total // 2
        out += [small, big] if auto == "SAME_UPPER" else [big, small]
    return tuple(out)


def _rounding(in_hw, kernel, stride, pads, ceil: bool, dilation=(1, 1)) -> str:
    """`exact` where the windows fit, else ONNX's floor or ceil."""
    for n, k, s, d, p0, p1 in zip(in_hw, kernel, stride, dilation, pads[0::2], pads[1::2]):
        if (n + p0 + p1 - (d * (k - 1) + 1)) % s:
            return "ceil" if ceil else "floor"
    return "exact"


def _spatial(imp, node, x) -> tuple[int, int, int]:
    t = imp.tensor(node, x)
    if len(t.shape) != 3:
        raise imp.refuse(node, f"on a {len(t.shape) + 1}-D input (cnnc has 2-D windows on N×C×H×W only)")
    return t.shape


def _take_pad(imp, node, x, kind: str):
    """(tensor, pads to add) for a window op, moving a Pad before it into its pads."""
    if not isinstance(x, Padded):
        return x, (0, 0, 0, 0)
    if kind == "max" and not (x.value == -np.inf or x.value <= -3.4e38):
        raise imp.refuse(node, f"after a Pad with value {x.value:g}", "a MaxPool pads with −∞; a zero Pad before it "
                         "changes results where inputs are negative")
    if kind != "max" and x.value != 0.0:
        raise imp.refuse(node, f"after a Pad with value {x.value:g}", "only zero padding folds into the window")
    return x.src, x.pads


def _legacy_broadcast(ins: list, axis) -> list:
    """Opset 6's broadcast=1: B lines up with A's dimensions from `axis` on; as NumPy broadcasting, B
    gets trailing 1s."""
    a, b = ins[0], ins[1]
    if axis is None or not isinstance(a, Tensor) or not isinstance(b, np.ndarray):
        return ins
    rank = len(a.shape) + 1
    return [a, b.reshape(b.shape + (1,) * max(0, rank - int(axis) % rank - b.ndim))] + list(ins[2:])


def _per_channel(imp, node, c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A constant broadcast against an N×C×H×W (or N×F) tensor as one value per channel, or None."""
    rank = len(shape) + 1
    c = np.asarray(c, np.float64)
    if c.ndim > rank:
        return None
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if full.shape[0] != 1 or any(d != 1 for d in full.shape[2:]) or full.shape[1] not in (1, shape[0]):
        return None
    return np.broadcast_to(full.reshape(-1), (shape[0],)).copy()


# ---- the ops ---------------------------------------------------------------------------------

def _conv(imp, node, i, ins, a):
    x, w = ins[0], imp.const(node, ins[1], "weights")
    b = imp.const(node, ins[2], "a bias") if len(ins) > 2 and ins[2] is not None else None
    x, extra = _take_pad(imp, node, x, "conv")
    c, h, wd = _spatial(imp, node, x)
    if w.ndim != 4:
        raise imp.refuse(node, f"with {w.ndim}-D weights (cnnc has 2-D convolutions only)")
    kernel = _ints(a.get("kernel_shape", w.shape[2:]))
    stride = _ints(a.get("strides", (1, 1)))
    dilation = _ints(a.get("dilations", (1, 1)))
    pads = _window_pads(imp, node, a, (h, wd), kernel, stride, dilation)
    pads = tuple(p + e for p, e in zip(pads, extra))
    params = {"weight": w}
    if b is not None:
        params["bias"] = b
    imp.layer("conv", dict(filters=w.shape[0], kernel=kernel, stride=stride, pad=pads, dilation=dilation,
                           groups=int(a.get("group", 1)), bias=b is not None,
                           round=_rounding((h, wd), kernel, stride, pads, False, dilation)), [x], node, i, params)


def _pool(kind: str):
    def convert(imp, node, i, ins, a):
        x, extra = _take_pad(imp, node, ins[0], kind)
        c, h, w = _spatial(imp, node, x)
        kernel = _ints(a["kernel_shape"])
        stride = _ints(a.get("strides", (1, 1)))
        if any(d != 1 for d in a.get("dilations", (1, 1))):
            raise imp.refuse(node, f"with dilations {list(a['dilations'])}")
        pads = _window_pads(imp, node, a, (h, w), kernel, stride)
        attrs = dict(kernel=kernel, stride=stride)
        if kind == "avg":
            count = bool(a.get("count_include_pad", 0))
            if any(extra) and any(pads) and not count:
                raise imp.refuse(node, "after a Pad with its own pads not counted in the average")
            # a Pad's zeros count in the average; without any padding the flag does not matter
            attrs["count_pad"] = count or any(extra) or not any(pads)
        pads = tuple(p + e for p, e in zip(pads, extra))
        ceil = bool(a.get("ceil_mode", 0))
        attrs.update(pad=pads, round=_rounding((h, w), kernel, stride, pads, ceil))
        imp.layer("maxpool" if kind == "max" else "avgpool", attrs, [x], node, i)
    return convert


def _global_avg(imp, node, i, ins, a):
    _spatial(imp, node, ins[0])
    imp.layer("globalavgpool", {}, [ins[0]], node, i)


def _dense(imp, node, i, x: Tensor, w: np.ndarray, b: np.ndarray | None):
    if len(x.shape) != 1:
        raise imp.refuse(node, f"on a {len(x.shape) + 1}-D input", "cnnc's dense takes N×F features")
    params = {"weight": w}
    if b is not None:
        params["bias"] = b
    imp.layer("dense", dict(units=w.shape[0], bias=b is not None), [x], node, i, params)


def _gemm(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    if a.get("transA", 0):
        raise imp.refuse(node, "with transA=1 on the input", "the input batch is N×F; transA would transpose it")
    w = imp.const(node, ins[1], "B (the weights)")
    if w.ndim != 2:
        raise imp.refuse(node, f"with a {w.ndim}-D B")
    w = w if a.get("transB", 0) else w.T  # (units, features), as dense keeps it
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:  # large weights: scaled only when needed, in float32
        w = w * np.float32(alpha)
    b = None
    if len(ins) > 2 and ins[2] is not None:
        c = imp.const(node, ins[2], "C (the bias)")
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, w.shape[0]):
            raise imp.refuse(node, f"with a C of shape {fmt_shape(c.shape)}", "cnnc's dense takes one bias per unit")
        b = np.broadcast_to(c.reshape(-1), (w.shape[0],)).astype(np.float64) * beta
    _dense(imp, node, i, x, w, b)


def _matmul(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    w = imp.const(node, ins[1], "the weights (the second operand)")
    if w.ndim != 2:
        raise imp.refuse(node, f"with a {w.ndim}-D second operand")
    _dense(imp, node, i, x, w.T, None)


def _batchnorm(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    if a.get("training_mode", 0) or (imp.opset < 7 and not a.get("is_test", 0)):
        raise imp.refuse(node, "in training mode",
                         "export the model for inference (in PyTorch, switch it to eval mode before exporting)")
    if imp.opset < 9 and not a.get("spatial", 1):
        raise imp.refuse(node, "with spatial=0 (statistics per position)")
    scale, bias, mean, var = (imp.const(node, v, "its statistics") for v in ins[1:5])
    momentum = round(1.0 - float(a.get("momentum", 0.9)), 7)  # ONNX keeps momentum·running; PyTorch moves by it
    imp.layer("batchnorm", dict(eps=float(a.get("epsilon", 1e-5)), momentum=min(max(momentum, 0.0), 1.0)), [x],
              node, i, {"weight": scale, "bias": bias, "running_mean": mean, "running_var": var})


def _lrn(imp, node, i, ins, a):
    size = int(a["size"])
    if size % 2 == 0:
        raise imp.refuse(node, f"with an even size {size}",
                         "ONNX's window of an even size reaches one channel further after than before; cnnc's "
                         "(PyTorch's) the other way")
    imp.layer("lrn", dict(size=size, alpha=float(a.get("alpha", 1e-4)), beta=float(a.get("beta", 0.75)),
                          k=float(a.get("bias", 1.0))), [imp.tensor(node, ins[0])], node, i)


def _concat(imp, node, i, ins, a):
    xs = [imp.tensor(node, x, "an input") for x in ins]
    rank = len(xs[0].shape) + 1
    axis = int(a["axis"]) % rank if "axis" in a else 1
    if axis != 1:
        raise imp.refuse(node, f"along axis {a.get('axis')}", "cnnc concatenates channels (axis 1)")
    imp.layer("concat", {}, xs, node, i)


def _sum(imp, node, i, ins, a):
    xs = [imp.tensor(node, x, "an input") for x in ins]
    if len(xs) == 1:
        imp.alias(node, xs[0])
        return
    imp.layer("add", {}, xs, node, i)


def _add(imp, node, i, ins, a, sign: float = 1.0):
    tensors = [x for x in ins if isinstance(x, Tensor)]
    if len(tensors) == 2 and sign > 0:
        return _sum(imp, node, i, ins, a)
    if len(tensors) != 1 or not any(isinstance(x, np.ndarray) for x in ins):
        imp.tensor(node, next(x for x in ins if not isinstance(x, np.ndarray)), "an input")
        raise imp.refuse(node, "of these operands")
    x = tensors[0]
    if sign < 0 and ins[0] is not x:
        raise imp.refuse(node, "of a constant minus a tensor")
    c = _per_channel(imp, node, imp.const(node, next(v for v in ins if isinstance(v, np.ndarray)), "the constant"),
                     x.shape)
    if c is None:
        raise imp.refuse(node, "with a constant that is not one value per channel")
    _affine(imp, node, i, x, None, sign * c)


def _affine(imp, node, i, x: Tensor, scale, shift) -> None:
    """y = x·scale + shift per channel, folded into the producer's weights where it has them."""
    if imp.foldable(x):
        p = imp.weights[x.node]
        d = imp.g.nodes[x.node]
        op = OPS[d["op"]]
        bias_flag = "bias" in op.attrs.model_fields  # conv and dense: a bias may be switched on
        # a scale joins a per-channel affine op's (BatchNorm's γ: Caffe's Scale layer after its BatchNorm)
        # or a normalisation's final x̂·γ + β; after a conv it stays a layer of its own (layer_scale)
        norm_affine = op.kind == "norm" and "bias" in p and p.get("weight", np.empty(0)).shape == p["bias"].shape
        scalable = "weight" in p and (op.fold is not None or norm_affine)
        shiftable = "bias" in p or bias_flag
        if (scale is None or scalable) and (shift is None or shiftable):
            if scale is not None:
                w = p["weight"].astype(np.float64)
                p["weight"] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
                if "bias" in p:
                    p["bias"] = (p["bias"] * scale).astype(np.float32)
            if shift is not None:
                if "bias" not in p:
                    d["attrs"] = d["attrs"].model_copy(update={"bias": True})
                    p["bias"] = np.zeros(x.shape[0], np.float32)
                p["bias"] = (p["bias"] + shift).astype(np.float32)
            imp.alias(node, x)
            return
    if shift is not None:
        raise imp.refuse(node, "of a per-channel constant here",
                         "cnnc adds per-channel constants only into the Conv, Gemm or BatchNormalization before")
    imp.layer("layer_scale", {}, [x], node, i, {"weight": scale})


def _mul(imp, node, i, ins, a):
    tensors = [x for x in ins if isinstance(x, Tensor)]
    if len(tensors) == 2:
        x, y = tensors
        for p, q in ((x, y), (y, x)):  # x · gate(x): Mul(x, Sigmoid(x)) is silu
            gate = OPS[imp.g.nodes[q.node]["op"]].onnx
            preds = list(imp.g.predecessors(q.node))
            if gate in SELF_GATED and preds == [p.node] and q.shape == p.shape:
                imp.node_uses[q.node] -= 1
                imp.layer(SELF_GATED[gate], {}, [p], node, i)
                return
        imp.layer("mul", {}, [x, y], node, i)
        return
    if len(tensors) != 1:
        imp.tensor(node, next(x for x in ins if not isinstance(x, np.ndarray)), "an input")
    x = tensors[0]
    c = imp.const(node, next(v for v in ins if isinstance(v, np.ndarray)), "the constant")
    s = _per_channel(imp, node, c, x.shape)
    if s is None:
        raise imp.refuse(node, "with a constant that is not one value per channel")
    _affine(imp, node, i, x, s, None)


def _div(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    c = imp.const(node, ins[1], "the divisor")
    s = _per_channel(imp, node, c, x.shape)
    if s is None:
        raise imp.refuse(node, "with a divisor that is not one value per channel")
    _affine(imp, node, i, x, 1.0 / s, None)


def _flatten(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    axis = int(a.get("axis", 1)) % (len(x.shape) + 1)
    if axis != 1:
        raise imp.refuse(node, f"with axis {a.get('axis')}", "cnnc flattens everything after the batch (axis 1)")
    if len(x.shape) == 1:
        imp.alias(node, x)
        return
    imp.layer("flatten", {}, [x], node, i)


def _target_shape(imp, node, x: Tensor, target) -> tuple[int, ...]:
    """A Reshape target without the batch: its first entry must be the batch (N, 0 or the input's)."""
    t = list(target.reshape(-1))
    if not t:
        raise imp.refuse(node, "to a scalar")
    first = t[0]
    total = math.prod(x.shape)
    if first is BATCH or first == 0 or (imp.batch is not None and first == imp.batch):
        rest = t[1:]
    elif first == -1 and all(isinstance(v, (int, np.integer)) and v > 0 for v in t[1:]) and \
            math.prod(t[1:]) == total:
        rest = t[1:]
    else:
        raise imp.refuse(node, f"to shape {t}", "cnnc keeps the batch as the first dimension")
    out = []
    for k, v in enumerate(rest):
        if v is BATCH or (v == 0 and k >= len(x.shape)):
            raise imp.refuse(node, f"to shape {t}")
        out.append(x.shape[k] if v == 0 else int(v))  # 0: the input's size (allowzero is for empty tensors)
    if out.count(-1) == 1:
        known = math.prod(v for v in out if v != -1)
        out[out.index(-1)] = total // known if known else 0
    if math.prod(out) != total or min(out, default=1) < 1:
        raise imp.refuse(node, f"from {fmt_shape(x.shape)} to {t}")
    return tuple(out)


def _reshape(imp, node, i, ins, a):
    x = ins[0]
    if isinstance(x, Grouped) and x.swapped:
        target = _target_shape(imp, node, x.src, _shape_operand(imp, node, ins))
        if target == x.src.shape:
            imp.layer("channel_shuffle", {"groups": x.groups}, [x.src], node, i)
            return
        raise imp.refuse(node, "of a transposed channel grouping to another shape")
    if isinstance(x, GroupView) and x.eps is not None:
        if _target_shape(imp, node, x.src, _shape_operand(imp, node, ins)) != x.src.shape:
            raise imp.refuse(node, "of normalised groups to another shape")
        c = x.src.shape[0]
        imp.layer("groupnorm", {"groups": x.groups, "eps": x.eps}, [x.src], node, i,
                  {"weight": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)})
        return
    x = imp.tensor(node, x)
    target = _target_shape(imp, node, x, _shape_operand(imp, node, ins))
    _to_shape(imp, node, i, x, target)


def _instancenorm(imp, node, i, ins, a):
    """Normalisation of each group of a GroupView, with unit scale and no shift (the affine follows)."""
    x = ins[0]
    scale, bias = (imp.const(node, v, "its scale and bias") for v in ins[1:3])
    if not isinstance(x, GroupView) or x.eps is not None or np.any(scale != 1) or np.any(bias != 0):
        raise imp.refuse(node, "except as group normalisation", "cnnc reads InstanceNormalization in a "
                         "GroupNorm: Reshape to N×g×…, InstanceNormalization with scale 1 and bias 0, Reshape back")
    imp.bind(node.output[0], GroupView(x.src, x.groups, float(a.get("epsilon", 1e-5))))


def _shape_operand(imp, node, ins) -> np.ndarray:
    if len(ins) < 2 or not isinstance(ins[1], np.ndarray):
        raise imp.refuse(node, "with a target shape computed from the input")
    return ins[1]


def _to_shape(imp, node, i, x: Tensor, target: tuple[int, ...]) -> None:
    if target == x.shape:
        imp.alias(node, x)
    elif len(target) == 1:
        imp.layer("flatten", {}, [x], node, i)
    elif len(target) == 4 and len(x.shape) == 3 and target[0] * target[1] == x.shape[0] \
            and tuple(target[2:]) == x.shape[1:]:
        imp.bind(node.output[0], Grouped(x, target[0]))
    elif len(target) == 2 and x.shape[0] % target[0] == 0 and target[0] > 1:
        imp.bind(node.output[0], GroupView(x, target[0]))
    else:
        raise imp.refuse(node, f"from {fmt_shape(x.shape)} to {fmt_shape(target)}",
                         "cnnc reshapes only to flatten, or in a channel shuffle")


def _squeeze(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    axes = a.get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = imp.const(node, ins[1], "the axes").tolist()
    rank = len(x.shape) + 1
    full = (None,) + x.shape
    axes = sorted(int(v) % rank for v in axes) if axes is not None else [k for k in range(1, rank) if full[k] == 1]
    if 0 in axes:
        raise imp.refuse(node, "of the batch dimension")
    target = tuple(d for k, d in enumerate(full) if k not in axes and k > 0)
    _to_shape(imp, node, i, x, target)


def _transpose(imp, node, i, ins, a):
    x = ins[0]
    perm = _ints(a.get("perm", ()))
    if isinstance(x, Grouped) and not x.swapped and perm == (0, 2, 1, 3, 4):
        imp.bind(node.output[0], Grouped(x.src, x.groups, True))
        return
    if isinstance(x, Tensor) and len(x.shape) == 3 and perm == (0, 2, 3, 1):
        imp.bind(node.output[0], Nhwc(x))
        return
    if isinstance(x, Nhwc) and x.normalized and perm == (0, 3, 1, 2):
        imp.alias(node, x.src)
        return
    raise imp.refuse(node, f"with perm {list(perm)}", "cnnc reads Transpose in a channel shuffle (Reshape to "
                     "N×g×C/g×H×W, Transpose 0 2 1 3 4, Reshape back) and around a LayerNormalization of "
                     "channels (0 2 3 1, LayerNormalization, 0 3 1 2)")


def _layernorm(imp, node, i, ins, a):
    x = ins[0]
    image = isinstance(x, Nhwc) and not x.normalized
    t = x.src if image else imp.tensor(node, x)
    if not image and len(t.shape) != 1:
        raise imp.refuse(node, f"over the last axis of {fmt_shape(t.shape)}", "cnnc normalises the channels: "
                         "of N×F features, or of an image transposed to N×H×W×C and back")
    if int(a.get("axis", -1)) not in (-1, 1 if not image else 3):
        raise imp.refuse(node, f"over axes from {a.get('axis')}")
    params = {"weight": imp.const(node, ins[1], "the scale")}
    if len(ins) > 2 and ins[2] is not None:
        params["bias"] = imp.const(node, ins[2], "the bias")
    else:
        params["bias"] = np.zeros(t.shape[0], np.float32)
    y = imp.layer("layernorm", {"eps": float(a.get("epsilon", 1e-5))}, [t], node, i, params)
    if image:
        imp.bind(node.output[0], Nhwc(y, True))


def _slice(imp, node, i, ins, a):
    """Channels lo … hi−1 (channel_slice), or every s-th row and column (the option-A shortcut)."""
    x = imp.tensor(node, ins[0])
    if imp.opset < 10:
        starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
    else:
        starts, ends = (imp.const(node, v, "the bounds").tolist() for v in ins[1:3])
        axes = imp.const(node, ins[3], "the axes").tolist() if len(ins) > 3 and ins[3] is not None else None
        steps = imp.const(node, ins[4], "the steps").tolist() if len(ins) > 4 and ins[4] is not None else None
    rank = len(x.shape) + 1
    axes = [int(v) % rank for v in (range(len(starts)) if axes is None else axes)]
    steps = [1] * len(axes) if steps is None else [int(v) for v in steps]
    full = (None,) + x.shape
    if axes == [1] and steps == [1]:
        c = x.shape[0]
        lo, hi = (int(v) + c if int(v) < 0 else min(int(v), c) for v in (starts[0], ends[0]))
        imp.layer("channel_slice", {"lo": lo, "hi": hi}, [x], node, i)
        return
    if sorted(axes) == [2, 3] and len(x.shape) == 3 and len(set(steps)) == 1 and steps[0] > 0 and \
            all(int(v) == 0 for v in starts) and all(int(e) >= full[ax] for e, ax in zip(ends, axes)):
        imp.layer("pad_channels", {"to": x.shape[0], "stride": steps[0]}, [x], node, i)
        return
    raise imp.refuse(node, f"over axes {axes} from {starts} to {ends} by {steps}",
                     "cnnc slices channels (axis 1, step 1), or takes every s-th row and column")


def _pad_channels(imp, node, i, x: Tensor, before: int, after: int) -> None:
    """Zero channels around x: pad_channels, joining the subsampling Slice before it."""
    from .ops import PadChannelsAttrs, pad_channels_split
    d = imp.g.nodes[x.node]
    # the Slice before made a pad_channels that adds no channels yet: it takes these
    joins = d["op"] == "pad_channels" and d["attrs"].to == x.shape[0] and imp.node_uses.get(x.node) == 1
    c = x.shape[0]
    to = c + before + after
    if pad_channels_split(PadChannelsAttrs(to=to), c) != (before, after):
        raise imp.refuse(node, f"with {before} channels before and {after} after",
                         "cnnc's pad_channels puts half the zero channels before, the odd one after")
    if not joins:
        imp.layer("pad_channels", {"to": to}, [x], node, i)
        return
    d["attrs"] = d["attrs"].model_copy(update={"to": to})
    imp.alias(node, Tensor(x.node, (to,) + x.shape[1:]))


def _softmax(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    rank = len(x.shape) + 1
    default = 1 if imp.opset < 13 else -1
    axis = int(a.get("axis", default)) % rank
    after = (None,) + x.shape
    ok = axis == 1 and (imp.opset >= 13 or all(d == 1 for d in after[2:]))
    if not ok:
        why = (f"over axes {axis}… of {fmt_shape(x.shape)} (opset {imp.opset} flattens them into one)"
               if imp.opset < 13 else f"along axis {a.get('axis', default)}")
        raise imp.refuse(node, why, "cnnc's softmax runs over the channels (axis 1)")
    imp.layer("softmax", {}, [x], node, i)


def _dropout(imp, node, i, ins, a):
    imp.alias(node, imp.tensor(node, ins[0]))


def _clip(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    if imp.opset < 11:
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    else:
        lo = float(imp.const(node, ins[1], "min")) if len(ins) > 1 and ins[1] is not None else -np.inf
        hi = float(imp.const(node, ins[2], "max")) if len(ins) > 2 and ins[2] is not None else np.inf
    if (lo, hi) == (0.0, 6.0):
        imp.layer("relu6", {}, [x], node, i)
    elif lo == 0.0 and hi == np.inf:
        imp.layer("relu", {}, [x], node, i)
    else:
        raise imp.refuse(node, f"with bounds {lo:g}, {hi:g}", "cnnc has Clip(0, 6) as relu6 and Clip(0) as relu")


def _hardsigmoid(imp, node, i, ins, a):
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    if not (math.isclose(alpha, 1 / 6, rel_tol=1e-6) and math.isclose(beta, 0.5)):
        raise imp.refuse(node, f"with alpha {alpha:g}, beta {beta:g}",
                         "cnnc's hardsigmoid is relu6(x + 3)/6: alpha 1/6, beta 0.5 (PyTorch's)")
    imp.layer("hardsigmoid", {}, [imp.tensor(node, ins[0])], node, i)


def _gelu(imp, node, i, ins, a):
    op = "gelu_tanh" if a.get("approximate", "none") == "tanh" else "gelu"
    imp.layer(op, {}, [imp.tensor(node, ins[0])], node, i)


def _prelu(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    slope = np.asarray(imp.const(node, ins[1], "the slope"))
    if imp.opset < 7 and slope.ndim == 1 and len(x.shape) == 3:  # opset 6: a vector of slopes is per channel
        slope = slope.reshape(-1, 1, 1)
    if slope.size == 1:
        imp.layer("prelu", {"shared": True}, [x], node, i, {"weight": slope.reshape(1)})
        return
    s = _per_channel(imp, node, slope, x.shape)
    if s is None:
        raise imp.refuse(node, f"with a slope of shape {fmt_shape(slope.shape)}", "cnnc's prelu has one slope per "
                         "channel or one for all")
    imp.layer("prelu", {}, [x], node, i, {"weight": s})


def _pad(imp, node, i, ins, a):
    x = imp.tensor(node, ins[0])
    mode = a.get("mode", "constant")
    if mode != "constant":
        raise imp.refuse(node, f"in mode {mode}")
    if imp.opset < 11:
        pads, value = _ints(a.get("pads", a.get("paddings", ()))), float(a.get("value", 0.0))
    else:
        pads = _ints(imp.const(node, ins[1], "the pads").tolist())
        value = float(imp.const(node, ins[2], "the value")) if len(ins) > 2 and ins[2] is not None else 0.0
        if len(ins) > 3 and ins[3] is not None:
            axes = [int(v) % 4 for v in imp.const(node, ins[3], "the axes").tolist()]
            full = [0] * 8
            for k, ax in enumerate(axes):
                full[ax], full[4 + ax] = pads[k], pads[len(axes) + k]
            pads = tuple(full)
    if len(x.shape) == 3 and len(pads) == 8 and min(pads) >= 0 and value == 0.0 and \
            not any(pads[k] for k in (0, 2, 3, 4, 6, 7)):
        return _pad_channels(imp, node, i, x, pads[1], pads[5])
    if len(x.shape) != 3 or len(pads) != 8 or any(pads[k] for k in (0, 1, 4, 5)) or min(pads) < 0:
        raise imp.refuse(node, f"with pads {list(pads)}", "cnnc folds zero Pads of height and width into the Conv "
                         "or pool after them")
    imp.bind(node.output[0], Padded(x, (pads[2], pads[6], pads[3], pads[7]), value, imp.span(i)))


def _elementwise(op: str, renames: dict[str, str] | None = None):
    def convert(imp, node, i, ins, a):
        fields = OPS[op].attrs.model_fields
        attrs = {}
        for k, v in a.items():
            ours = (renames or {}).get(k, k)
            if ours not in fields:
                raise imp.refuse(node, f"with attribute {k}")
            attrs[ours] = v
        imp.layer(op, attrs, [imp.tensor(node, ins[0])], node, i)
    return convert


def _table_elementwise() -> dict[str, Callable]:
    """The unary ops of the table that are one ONNX operator each (Relu, Sigmoid, Tanh, ...)."""
    by_onnx: dict[str, list[str]] = {}
    for name, op in OPS.items():
        if op.formula is not None and op.user and op.onnx and op.onnx.isidentifier():
            by_onnx.setdefault(op.onnx, []).append(name)
    renames = {"leaky_relu": {"alpha": "slope"}}
    return {onnx: _elementwise(names[0], renames.get(names[0])) for onnx, names in by_onnx.items()
            if len(names) == 1}


# ---- element-wise expressions ---------------------------------------------------------------------

def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _softplus(v):
    return np.logaddexp(0.0, v)


# ONNX's element-wise operators as NumPy, by the number of their tensor inputs
_UNARY = {"Erf": _erf, "Exp": np.exp, "Tanh": np.tanh, "Sigmoid": _sigmoid, "Relu": lambda v: np.maximum(v, 0.0),
          "Softplus": _softplus, "Sqrt": np.sqrt, "Neg": np.negative, "Abs": np.abs, "Log": np.log,
          "Reciprocal": lambda v: 1.0 / v}
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
           "Max": np.maximum, "Min": np.minimum}
# operators that begin an expression on a tensor of the graph (the others, Relu or Sigmoid, are layers
# by themselves and join an expression only inside one)
_STARTS = {"Erf", "Exp", "Softplus", "Sqrt", "Neg", "Abs", "Log", "Reciprocal", "Pow"}
_FORMULA_FUNCS = {"exp": np.exp, "expm1": np.expm1, "log": np.log, "log1p": np.log1p, "sqrt": np.sqrt,
                  "tanh": np.tanh, "erf": _erf, "abs": np.abs, "sigmoid": _sigmoid, "softplus": _softplus,
                  "min": np.minimum, "max": np.maximum, "clip": np.clip, "where": np.where}
_BIN_OPS = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, ">": np.greater, "<": np.less,
            ">=": np.greater_equal, "<=": np.less_equal}
PROBE = np.concatenate([np.linspace(-8.0, 8.0, 1601), [-40.0, -20.0, 20.0, 40.0]])


def _evaluate(e, x: np.ndarray) -> np.ndarray:
    """A table formula (compiler/formula.py's tree) at the points x."""
    if e.kind == "num":
        return np.full_like(x, e.value)
    if e.kind == "var":
        return x
    args = [_evaluate(a, x) for a in e.args]
    if e.kind == "neg":
        return -args[0]
    if e.kind in ("bin", "cmp"):
        return _BIN_OPS[e.name](*args).astype(np.float64)
    return _FORMULA_FUNCS[e.name](*args)


def _matching_op(fn) -> str | None:
    """The table's parameterless activation that fn computes on PROBE's points, or None."""
    with np.errstate(all="ignore"):
        got = fn(PROBE.copy())
        if not np.all(np.isfinite(got)):
            return None
        for name, op in OPS.items():
            if op.formula is None or op.formula.params or not op.user:
                continue
            want = _evaluate(op.formula.fwd, PROBE.copy())
            if np.allclose(got, want, rtol=1e-5, atol=1e-6):
                return name
    return None


def _affine_of(fn) -> tuple[float | None, float]:
    """(a, b) where fn(x) = a·x + b on PROBE's points, else (None, 0)."""
    with np.errstate(all="ignore"):
        y = fn(PROBE.copy())
    b = float(fn(np.zeros(1))[0])
    a = float(fn(np.ones(1))[0]) - b
    if np.all(np.isfinite(y)) and np.allclose(y, a * PROBE + b, rtol=1e-6, atol=1e-7):
        return a, b
    return None, 0.0


def _expression_step(imp, node, i, ins, a) -> Expression | None:
    """The node as a step of an element-wise expression of one tensor, or None when it is not one."""
    op = node.op_type
    if op not in _UNARY and op not in _BINARY and op not in ("Clip", "HardSigmoid"):
        return None
    srcs, parts = set(), []
    for v in ins:
        if isinstance(v, Expression):
            srcs.add(v.src.node)
            parts.append(v.fn)
        elif isinstance(v, Tensor):
            srcs.add(v.node)
            parts.append(lambda z: z)
        elif isinstance(v, np.ndarray) and v.dtype != object and v.size == 1:
            c = float(v.reshape(-1)[0])
            parts.append(lambda z, c=c: np.full_like(z, c))
        elif v is None:
            parts.append(None)
        else:
            return None
    if len(srcs) != 1:
        return None
    src = next(v.src if isinstance(v, Expression) else v for v in ins if isinstance(v, (Expression, Tensor)))
    inside = any(isinstance(v, Expression) for v in ins)
    tensors = [v for v in ins if isinstance(v, Tensor)]
    self_binary = op in _BINARY and len(tensors) == 2  # x·x, x + x
    scalar = op in _BINARY and len(tensors) == 1 and len(ins) == 2  # x·0.5: part of GELU, or a plain scale
    if not (inside or self_binary or op in _STARTS or (scalar and op != "Pow" and _scalar_begins(imp, node))):
        return None
    if inside and not tensors and any(v.complete() for v in ins if isinstance(v, Expression)):
        return None  # gelu(x)·0.5: the activation is whole; what follows applies to its result
    if op in _UNARY:
        f, g = _UNARY[op], parts[0]
        fn = lambda z: f(g(z))  # noqa: E731
    elif op in _BINARY:
        f, g, h = _BINARY[op], parts[0], parts[1]
        fn = lambda z: f(g(z), h(z))  # noqa: E731
    elif op == "Clip":
        lo, hi = (a.get("min", -np.inf), a.get("max", np.inf)) if imp.opset < 11 else \
            ((float(ins[k]) if len(ins) > k and isinstance(ins[k], np.ndarray) else (-np.inf, np.inf)[k - 1])
             for k in (1, 2))
        g = parts[0]
        fn = lambda z: np.clip(g(z), lo, hi)  # noqa: E731
    else:
        alpha, beta, g = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)), parts[0]
        fn = lambda z: np.clip(alpha * g(z) + beta, 0.0, 1.0)  # noqa: E731
    return Expression(src, fn, node, i)


def _scalar_begins(imp, node) -> bool:
    """Whether a tensor times (plus, ...) a scalar starts an expression: when its result feeds only
    element-wise operators (GELU's x·(1/√2) goes to Erf), not when it is a plain scale before a layer."""
    readers = imp.readers.get(node.output[0], [])
    return bool(readers) and all(r in _UNARY or r in _BINARY or r in ("Clip", "HardSigmoid") for r in readers)


# x · g(x) by the ONNX operator of g: the activations opsets before HardSwish (14) spell out
SELF_GATED = {"Sigmoid": "silu", "HardSigmoid": "hardswish"}

HANDLERS: dict[str, Callable] = {
    **_table_elementwise(),
    "Conv": _conv, "MaxPool": _pool("max"), "AveragePool": _pool("avg"), "GlobalAveragePool": _global_avg,
    "Gemm": _gemm, "MatMul": _matmul, "BatchNormalization": _batchnorm, "LRN": _lrn, "Concat": _concat,
    "Sum": _sum, "Add": _add, "Sub": lambda imp, node, i, ins, a: _add(imp, node, i, ins, a, -1.0), "Mul": _mul,
    "Div": _div, "Flatten": _flatten, "Reshape": _reshape, "Squeeze": _squeeze, "Transpose": _transpose,
    "Softmax": _softmax, "Dropout": _dropout, "Identity": _dropout, "Clip": _clip, "HardSigmoid": _hardsigmoid,
    "Gelu": _gelu, "PRelu": _prelu, "Pad": _pad, "Slice": _slice, "LayerNormalization": _layernorm,
    "InstanceNormalization": _instancenorm,
}


# ---- constant folding ------------------------------------------------------------------------

def _int_array(v) -> np.ndarray:
    """Shape entries: an object array while it holds the batch symbol, else int64."""
    a = np.asarray(v)
    if a.dtype != object or any(x is BATCH for x in a.reshape(-1)):
        return a
    return a.astype(np.int64)


def _fold_shape(imp, ins, a):
    x = ins[0]
    if isinstance(x, Tensor):
        dims = [BATCH, *x.shape]
        s = np.array(dims, dtype=object)
    elif isinstance(x, np.ndarray):
        s = np.array(x.shape, dtype=np.int64)
    else:
        raise CnncError("Shape of a value cnnc cannot express")
    start, end = int(a.get("start", 0)), a.get("end")
    s = s[start:end if end is None else int(end)]
    return _int_array(s)


def _fold_constant(imp, ins, a):
    onnx = imp.onnx
    if "value" in a:
        return onnx.numpy_helper.to_array(a["value"]) if not isinstance(a["value"], np.ndarray) else a["value"]
    for k, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                     ("value_ints", np.int64)):
        if k in a:
            return np.asarray(a[k], dtype)
    raise CnncError("Constant without a value cnnc can read")


def _fold_constant_of_shape(imp, ins, a):
    shape = [int(v) for v in _no_batch(ins[0], "ConstantOfShape").reshape(-1)]
    value = imp.onnx.numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
    return np.full(shape, value.reshape(-1)[0], dtype=value.dtype)


def _no_batch(x, op: str) -> np.ndarray:
    if x.dtype == object:
        raise CnncError(f"{op} of a shape that depends on the batch size")
    return x


def _fold_gather(imp, ins, a):
    data, idx = ins
    return _int_array(np.take(data, np.asarray(idx).astype(np.int64), axis=int(a.get("axis", 0))))


def _axes(ins, a, k=1):
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    if len(ins) > k and ins[k] is not None:
        return [int(v) for v in np.asarray(ins[k]).reshape(-1)]
    return None


def _fold_unsqueeze(imp, ins, a):
    x = ins[0]
    axes = sorted(v % (x.ndim + len(_axes(ins, a))) for v in _axes(ins, a))
    for ax in axes:
        x = np.expand_dims(x, ax)
    return x


def _fold_squeeze(imp, ins, a):
    axes = _axes(ins, a)
    x = ins[0]
    return np.squeeze(x, axis=tuple(v % x.ndim for v in axes)) if axes else np.squeeze(x)


def _fold_concat(imp, ins, a):
    symbolic = any(x.dtype == object for x in ins)
    return _int_array(np.concatenate([x.astype(object) if symbolic else x for x in ins], axis=int(a["axis"])))


def _fold_reshape(imp, ins, a):
    x, shape = ins[0], [int(v) for v in _no_batch(ins[1], "Reshape").reshape(-1)]
    shape = [x.shape[k] if v == 0 and not a.get("allowzero", 0) else v for k, v in enumerate(shape)]
    return x.reshape(shape)


def _fold_cast(imp, ins, a):
    x = ins[0]
    if x.dtype == object:
        return x
    return x.astype(imp.onnx.helper.tensor_dtype_to_np_dtype(int(a["to"])))


def _fold_slice(imp, ins, a):
    x = ins[0]
    if imp.opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = ins[1].tolist(), ins[2].tolist()
        axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else None
        steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _fold_binary(fn):
    def fold(imp, ins, a):
        try:
            return _int_array(fn(ins[0], ins[1])) if ins[0].dtype == object or ins[1].dtype == object else \
                fn(ins[0], ins[1]).astype(np.result_type(ins[0], ins[1]))
        except TypeError:
            raise CnncError("arithmetic on the batch size cnnc cannot follow") from None
    return fold


def _fold_transpose(imp, ins, a):
    perm = a.get("perm")
    return np.transpose(ins[0], None if perm is None else [int(v) for v in perm])


def _fold_identity(imp, ins, a):
    return ins[0]


FOLDS: dict[str, Callable] = {
    "Constant": _fold_constant, "Shape": _fold_shape, "Gather": _fold_gather, "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze, "Concat": _fold_concat, "Reshape": _fold_reshape, "ConstantOfShape":
    _fold_constant_of_shape, "Cast": _fold_cast, "Slice": _fold_slice, "Identity": _fold_identity,
    "Transpose": _fold_transpose,
    "Add": _fold_binary(np.add), "Sub": _fold_binary(np.subtract), "Mul": _fold_binary(np.multiply),
    "Div": _fold_binary(lambda x, y: x // y if np.asarray(x).dtype.kind in "iuO" else x / y),
}

