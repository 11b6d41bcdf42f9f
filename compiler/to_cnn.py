"""Write a checked graph back as readable `.cnn` source (what `cnnc import` produces).

`write_cnn(g)` renders a front-end graph (compiler/graph.py's conventions; shapes are inferred
here when missing) as a `.cnn` text that checks to the same graph: the same ops in the same
order, the same attributes, the same edges, hence the same counts and, with the weights moved
by the name map, the same outputs. Every attribute of every user op is written from the op
table: positional fields first (op.positional), then `attr=value` where the value differs from
the effective default (the attribute model's, or a `default` line the writer chooses for a
value most layers of an op share). Tensors used more than once or out of order get names
(`x1 = ...`); merges take them as `add(x1)`, `concat(x1, x2)`; a split names its parts.

With `blocks=True` repeated structure is recovered without reading any block information of
the graph (an imported graph has none): the graph is cut at its articulation points (nodes
every path passes through, with no edge jumping over them) into single-input single-output
segments; segments with a branch inside (a residual, a dense layer, an inception) that occur
at least twice with the same ops and edges become a block, widened by the single layers that
follow (and precede) every occurrence. Runs of single layers between those blocks that repeat
(MobileNetV2's inverted residuals without a shortcut) become blocks too. Attributes that differ
between occurrences become block parameters, one per distinct column of values, integer
multiples of another parameter written as `4*c`, a parameter defaulting to the op table's
default where some occurrences have it; an occurrence that alone differs from the others in a
kernel size and more (a stem that happens to match) is left as layers. Consecutive identical
calls are written `block(args) * n`, consecutive identical runs of layers or calls as a group,
`(conv 64 3x3 pad=1 -> relu) * 2`. A graph with an unused layer is written flat, and an edge
that jumps over a stretch of the network (a skip from the input to the end) leaves no cut, so
no block, inside that stretch.

Layer names follow the language's automatic naming (`conv3`, `add_block2.bn1`), so the result
carries the map old layer name → new layer name and old parameter name → new parameter name
(`{layer}.{tensor}` as runtime/model.py names them) that moving weights across needs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from pydantic import TypeAdapter, ValidationError

from cnnc.dsl.errors import CnncError, Diagnostics, InternalError

from .graph import inputs_of
from .ops import OPS, OpDef, lookup
from .passes import infer_shapes
from .train_config import TrainConfig

WIDTH = 100  # a line longer than this is broken at an arrow
INDENT = "    "
# words of the language that a network, input, tensor or parameter name may not be
_RESERVED = {"network", "input", "classes", "default", "import", "block", "layers", "train", "for", "in", "range",
             "if", "elif", "else", "and", "or", "not", "true", "false", "same", "valid", "exact", "floor", "ceil",
             "len", "max", "min", "abs", "round", "make_divisible"}
_COMMON = ("name", "trainable", "lr_mult", "decay_mult")  # attributes every layer has (ops.Attrs)
# block parameter names for the attributes they stand for, short where customary
_PARAM_WORDS = {"filters": "c", "kernel": "k", "units": "u", "dilation": "d", "groups": "g", "round": "rounding"}


@dataclass
class Written:
    """A written `.cnn` text and how its layer and parameter names relate to the graph's."""

    text: str
    layer_names: dict[str, str]  # old layer name → new layer name
    param_names: dict[str, str]  # old qualified parameter name → new (`{layer}.{tensor}`, runtime/model.py)

    def lines(self) -> int:
        """Lines that hold code (not blank, not only a comment)."""
        return sum(1 for line in self.text.splitlines() if line.strip() and not line.strip().startswith("#"))


def write_cnn(graph: nx.MultiDiGraph, blocks: bool = True) -> str:
    """The `.cnn` text of a front-end graph; see the module docstring."""
    return write(graph, blocks).text


def write_cnn_with_names(graph: nx.MultiDiGraph, blocks: bool = True) -> tuple[str, dict[str, str]]:
    """(text, {old qualified parameter name: new}) for carrying weights over to the written file."""
    w = write(graph, blocks)
    return w.text, w.param_names


def write(graph: nx.MultiDiGraph, blocks: bool = True) -> Written:
    g = _with_shapes(graph)
    return _Writer(g, blocks).run()


# ---- values ---------------------------------------------------------------------------------------

_ADAPTERS: dict[tuple[type, str], TypeAdapter] = {}


def _adapter(model: type, f: str) -> TypeAdapter:
    key = (model, f)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(model.model_fields[f].rebuild_annotation())
    return _ADAPTERS[key]


def _accepts(model: type, f: str, candidate: Any, value: Any) -> bool:
    """Whether the field reads `candidate` (as the parser would give it) as `value`."""
    try:
        return _adapter(model, f).validate_python(candidate) == value
    except ValidationError:
        return False


def _literal(v: Any, dims: bool = False) -> str:
    """A value as the language writes it. `dims`: a tuple of positive integers as a size, 3x3."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InternalError(f"cannot write the number {v}")
        return repr(v)
    if isinstance(v, str):
        if _is_name(v):
            return v
        if '"' in v or "\n" in v:
            raise CnncError(f"cannot write the string {v!r} in a .cnn file")
        return f'"{v}"'
    if isinstance(v, tuple):
        if dims and len(v) >= 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
            return "x".join(map(str, v))
        return "(" + ", ".join(_literal(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    raise InternalError(f"cannot write the value {v!r}")


def _is_name(s: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s) is not None


def attr_text(model: type, f: str, v: Any, positional: bool = False) -> str:
    """The shortest text the field `f` reads back as `v`: a square pair as one number, equal pads as one,
    a positional size (a kernel) always as a size, 3x3."""
    if isinstance(v, tuple) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        if positional and len(v) == 2 and _accepts(model, f, tuple(v), v):
            return _literal(v, dims=True)
        if len(set(v)) == 1 and _accepts(model, f, v[0], v):
            return str(v[0])
        if len(v) == 4 and v[0] == v[1] and v[2] == v[3] and _accepts(model, f, (v[0], v[2]), v):
            return _literal((v[0], v[2]))
        return _literal(v, dims=len(v) == 2)
    if v is None:
        raise InternalError(f"cannot write `{f}=none`")
    return _literal(v)


def _default(model: type, f: str) -> Any:
    info = model.model_fields[f]
    return _NO_DEFAULT if info.is_required() else info.default


_NO_DEFAULT = object()


# ---- the graph's nodes as elements of a body --------------------------------------------------------

@dataclass
class Item:
    """One element of a body: a layer, a block call or a repeated group, and the values it reads."""

    kind: str  # "layer", "merge", "split", "part", "call", "group"
    out: int  # the node whose value it produces (the last one of a call or group)
    ins: list[int]  # the nodes it reads, in port order
    text: str = ""  # without tensor operands (a merge's are added when the layout is known)
    weighted: bool = False  # a layer that computes (MACs: conv, dense) or a call: one per line
    parts: list[int] = field(default_factory=list)  # a split: its part nodes
    nodes: list[int] = field(default_factory=list)  # the graph nodes it stands for, in order
    block: "_Block | None" = None  # a call: the block
    args: tuple = ()  # a call: its argument texts
    instances: list[list[int]] = field(default_factory=list)  # a call: the nodes of each instance it makes
    members: list["Item"] = field(default_factory=list)  # a group: the items of all its repetitions


class _Namer:
    """The automatic layer names of one scope (compiler/build.py's Frame.next_name)."""

    def __init__(self):
        self.counters: Counter = Counter()

    def next(self, base: str) -> str:
        self.counters[base] += 1
        sep = "_" if base[-1:].isdigit() else ""
        return f"{base}{sep}{self.counters[base]}"


@dataclass
class _Block:
    """A recovered block: its occurrences (aligned node lists), parameters and the expressions they fill."""

    name: str
    instances: list[list[int]]  # node ids of each occurrence, position by position
    params: list[tuple[str, str | None]] = field(default_factory=list)  # (name, default text or None)
    exprs: dict[tuple[int, str], str] = field(default_factory=dict)  # (position, field) → expression
    args: list[list[str | None]] = field(default_factory=list)  # per occurrence, per parameter: text (None: default)
    local_names: list[str] = field(default_factory=list)  # the layer name at each position, inside an instance

    def call_text(self, k: int) -> str:
        """`name(64, stride=2)`: parameters without a default by position, the others by name where given."""
        shown = []
        for (p, default), t in zip(self.params, self.args[k]):
            if default is None:
                shown.append(t)
            elif t is not None:
                shown.append(f"{p}={t}")
        return f"{self.name}({', '.join(shown)})"


class _Writer:
    def __init__(self, g: nx.MultiDiGraph, blocks: bool):
        self.g = g
        self.blocks = blocks
        self.order = sorted(g.nodes)
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.input = g.graph["input"]
        self.output = g.graph["output"]
        self.consumers: dict[int, list[tuple[int, int]]] = {n: [] for n in g.nodes}
        for u, v, port in g.edges(data="port"):
            self.consumers[u].append((v, port))
        self.defaults: dict[str, dict[str, Any]] = {}
        self.new_names: dict[int, str] = {}

    def is_part(self, n: int) -> bool:
        """One output of a layer with several (a split's channel_slice): written by the split's statement."""
        ins = inputs_of(self.g, n)
        return len(ins) == 1 and self.op(ins[0]).outputs is not None

    def check_parts(self, n: int) -> None:
        """A layer with several outputs is written `a, b = ... -> split 2`: its consumers must be its parts."""
        op, a = self.op(n), self.attrs(n)
        want = []
        for i in range(op.outputs(a)):
            part_op, kw = op.part(a, i)
            want.append((part_op, OPS[part_op].attrs(**kw)))
        got = sorted(((self.g.nodes[v]["op"], self.attrs(v)) for v, _ in self.consumers[n]),
                     key=lambda x: want.index(x) if x in want else -1)
        if got != want:
            raise CnncError(f"`{self.g.nodes[n]['name']}` ({op.name}) feeds other layers than its "
                            f"{len(want)} parts: a .cnn file cannot write that")

    def word(self, n: int) -> str:
        """The word a layer is written with: the op's name, or a much shorter alias (bn, gap)."""
        op = self.op(n)
        short = min((op.name,) + op.aliases, key=len)
        return short if len(op.name) > 8 and len(short) <= len(op.name) - 3 else op.name

    def consumers_in_part_order(self, n: int) -> list[int]:
        op, a = self.op(n), self.attrs(n)
        order = [OPS[p].attrs(**kw) for p, kw in (op.part(a, i) for i in range(op.outputs(a)))]
        return sorted((v for v, _ in self.consumers[n]), key=lambda v: order.index(self.attrs(v)))

    def op(self, n: int) -> OpDef:
        return OPS[self.g.nodes[n]["op"]]

    def attrs(self, n: int):
        return self.g.nodes[n]["attrs"]

    # ---- the whole file
    def run(self) -> Written:
        g = self.g
        for n in self.order:
            if not self.op(n).user and n != self.input:
                d = g.nodes[n]
                raise CnncError(f"`{d['name']}` is a `{d['op']}`, which a .cnn file cannot hold: write the front-end "
                                "graph, before optimisation")
        self.choose_defaults()
        input_name = g.nodes[self.input]["name"]
        if not _is_name(input_name) or input_name in _RESERVED - {"input"} or lookup(input_name):
            input_name = "input"
        self.input_name = input_name
        self.new_names[self.input] = input_name
        head = [f"network {_identifier(g.graph.get('network') or 'network')}"]
        dims = tuple(g.nodes[self.input]["attrs"].dims)
        label = "" if input_name == "input" else input_name + ": "
        head.append(f"input {label}{_literal(dims, dims=True) if len(dims) > 1 else dims[0]}")
        if g.graph.get("classes"):
            head.append(f"classes {g.graph['classes']}")
        for op, fields in self.defaults.items():
            model = OPS[op].attrs
            head.append(f"default {op} " + " ".join(f"{f}={attr_text(model, f, v)}" for f, v in fields.items()))
        units = self.recover() if self.blocks else []
        block_texts = [self.block_text(b) for b in units]
        in_blocks = {n for b in units for inst in b.instances for n in inst}
        top = self.classes_layer(in_blocks)
        items = self.body_items(self.order[1:], units,
                                lambda n: {top[1]: "classes"} if top and n == top[0] else None)
        if self.blocks:
            items = self.repeat_groups(items)
        self.name_items(items, _Namer())
        body = self.layout(items, self.input, input_name, self.output, frozenset({input_name}))
        parts = ["\n".join(head)] + block_texts + ["layers:\n" + body]
        train = self.train_text()
        if train:
            parts.append(train)
        text = "\n\n".join(parts) + "\n"
        return Written(text, *self.name_maps())

    def classes_layer(self, skip: set[int]) -> tuple[int, str] | None:
        """(node, field): the last layer whose first positional value is `classes` (`dense classes`)."""
        classes = self.g.graph.get("classes")
        for n in reversed(self.order[1:]):
            op = self.op(n)
            if n in skip or not op.positional or self.is_part(n):
                continue
            v = self.attrs(n).get(op.positional[0])
            if isinstance(v, int) and not isinstance(v, bool) and v == classes:
                return n, op.positional[0]
        return None

    def name_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        layers, params = {}, {}
        for n in self.order:
            old, new = self.g.nodes[n]["name"], self.new_names[n]
            layers[old] = new
            ins = [self.g.nodes[u]["shape"] for u in inputs_of(self.g, n)]
            for spec in self.op(n).params(self.attrs(n), ins):
                params[f"{old}.{spec.name}"] = f"{new}.{spec.name}"
        return layers, params

    def choose_defaults(self) -> None:
        """`default op attr=value` for a value most layers of an op share that differs from the table's."""
        by_op: dict[str, list[int]] = {}
        for n in self.order[1:]:
            if self.is_part(n):
                continue
            by_op.setdefault(self.g.nodes[n]["op"], []).append(n)
        for op, nodes in by_op.items():
            model = OPS[op].attrs
            if OPS[op].tensor_args:
                continue
            for f in model.model_fields:
                if f in OPS[op].positional or f == "name":
                    continue
                if any(isinstance(self.attrs(n).get(f), tuple) for n in nodes):
                    continue  # sizes and pads stay on their layers: `conv 64 3x3` should mean what it says
                values = Counter(_hashable(self.attrs(n).get(f)) for n in nodes)
                value, count = values.most_common(1)[0]
                table = _hashable(_default(model, f))
                if value != table and value is not None and count > values.get(table, 0) and count >= 2:
                    self.defaults.setdefault(op, {})[f] = self.attrs(next(n for n in nodes if _hashable(
                        self.attrs(n).get(f)) == value)).get(f)

    def effective_default(self, op: str, f: str) -> Any:
        if f in self.defaults.get(op, {}):
            return self.defaults[op][f]
        return _default(OPS[op].attrs, f)

    def train_text(self) -> str:
        config = self.g.graph.get("train")
        if config is None:
            return ""
        lines = []
        for f, info in TrainConfig.model_fields.items():
            v = getattr(config, f)
            if v != info.default and v is not None:
                text = _literal(tuple(v) if isinstance(v, (list, tuple)) else v)
                lines.append(f"{INDENT}{f} {text}" + (" pad" if f == "crop" else ""))  # `crop N` alone is ambiguous
        return "train:\n" + "\n".join(lines) if lines else ""

    # ---- one layer
    def layer_text(self, n: int, exprs: dict[str, str] | None = None) -> str:
        """The layer in command form; `exprs` replaces attribute values by expressions (block parameters)."""
        exprs = exprs or {}
        op, a = self.op(n), self.attrs(n)
        model = op.attrs
        words = [self.word(n)]
        texts: dict[str, str] = {}
        for f in [f for f in model.model_fields if f not in _COMMON] + list(_COMMON[1:]):
            if f in exprs:
                texts[f] = exprs[f]
                continue
            v = a.get(f)
            d = self.effective_default(op.name, f)
            if d is not _NO_DEFAULT and _hashable(v) == _hashable(d):
                continue
            texts[f] = attr_text(model, f, v, positional=f in op.positional)
        # positional fields up to the last one given, while each reads safely as a command argument
        given = [f for f in op.positional if f in texts]
        last = op.positional.index(given[-1]) if given else -1
        as_keyword = False
        for f in op.positional[:last + 1]:
            t = texts.pop(f) if f in texts else attr_text(model, f, a.get(f), positional=True)
            as_keyword = as_keyword or t[:1] in "(-"  # `conv (4, 8)` would read as a call
            words.append(f"{f}={t}" if as_keyword else t)
        words += [f"{f}={t}" for f, t in texts.items()]
        return " ".join(words)

    # ---- bodies
    def body_items(self, nodes: list[int], units: list[_Block], exprs_at=None) -> list[Item]:
        """Items for `nodes` (in order); the occurrences of recovered blocks become calls."""
        starts = {inst[0]: (b, k) for b in units for k, inst in enumerate(b.instances)}
        items: list[Item] = []
        i = 0
        while i < len(nodes):
            n = nodes[i]
            if n in starts:
                b, k = starts[n]
                inst = b.instances[k]
                items.append(Item("call", inst[-1], [self.unit_input(inst)], b.call_text(k), weighted=True,
                                  nodes=list(inst), block=b, args=tuple(b.args[k]), instances=[list(inst)]))
                i += len(inst)
                continue
            items.append(self.node_item(n, exprs_at(n) if exprs_at else None))
            i += 1
        return items

    def unit_input(self, inst: list[int]) -> int:
        inside = set(inst)
        outside = {u for n in inst for u in inputs_of(self.g, n) if u not in inside}
        if len(outside) != 1:
            raise InternalError(f"a recovered block has {len(outside)} inputs")
        return outside.pop()

    def node_item(self, n: int, exprs: dict[str, str] | None = None) -> Item:
        op = self.op(n)
        ins = inputs_of(self.g, n)
        if op.tensor_args:
            return Item("merge", n, ins, self.word(n), nodes=[n])
        if op.outputs is not None:
            self.check_parts(n)
            return Item("split", n, ins, self.layer_text(n, exprs), nodes=[n])
        if self.is_part(n):
            return Item("part", n, ins, nodes=[n])
        return Item("layer", n, ins, self.layer_text(n, exprs), weighted=self.computes(n), nodes=[n])

    def name_items(self, items: list[Item], namer: _Namer) -> None:
        """The new names of the nodes the items stand for, as the builder will give them: per word and
        scope, instances after their block, a split's parts after the split (`split1_0`)."""
        for it in items:
            if it.kind == "call":
                for nodes in it.instances:
                    inst = namer.next(it.block.name)
                    for n, local in zip(nodes, it.block.local_names):
                        self.new_names[n] = f"{inst}.{local}"
            elif it.kind == "group":
                self.name_items(it.members, namer)
            elif it.kind == "part":
                i = self.consumers_in_part_order(it.ins[0]).index(it.out)
                self.new_names[it.out] = f"{self.new_names[it.ins[0]]}_{i}"
            else:
                self.new_names[it.out] = namer.next(self.word(it.out))

    def layout(self, items: list[Item], body_in: int, in_name: str, body_out: int,
               reserved: frozenset[str] = frozenset()) -> str:
        """Statements for the items: chains of flowing tensors, names where a value is read elsewhere."""
        # which reads are the flowing tensor (the item right after the producer, its first operand)
        for it in items:
            if it.kind == "split":
                it.parts = self.consumers_in_part_order(it.out)
        chained = []
        prev = body_in
        for it in items:
            if it.kind == "part":  # named by its split's statement
                chained.append(False)
                continue
            ok = bool(it.ins) and it.ins[0] == prev
            chained.append(ok)
            prev = it.parts[-1] if it.kind == "split" and it.parts else it.out
        named: dict[int, str] = {body_in: in_name}
        counter = 0

        def fresh() -> str:
            nonlocal counter
            while True:
                counter += 1
                name = f"x{counter}"
                if name not in reserved:
                    return name

        needs: set[int] = set()
        for k, it in enumerate(items):
            if it.kind == "part":
                continue
            for p, u in enumerate(it.ins):
                if u == body_in:
                    continue
                if not (p == 0 and chained[k]):
                    needs.add(u)
        if items and items[-1].out != body_out and body_out != body_in:
            needs.add(body_out)
        for it in items:
            needs.update(it.parts)
        for k, it in enumerate(items):
            # a merge after a named tensor starts a statement, where it takes only the tensors it names
            if it.kind == "merge" and chained[k] and it.ins[0] in needs:
                chained[k] = False
        # statements: (names, [(text, computes, kind)])
        statements: list[tuple[list[str], list[tuple[str, bool, str]]]] = []
        current: list[tuple[str, bool, str]] | None = None
        for k, it in enumerate(items):
            if it.kind == "part":
                continue
            if it.kind == "merge" and current is None:
                chained[k] = False  # at a statement's start: its operands are the tensors it names, `in` too
            if it.kind == "merge":
                operands = it.ins[1:] if chained[k] else it.ins
                text = f"{it.text}({', '.join(named[u] for u in operands)})"
            else:
                text = it.text
            if not chained[k]:
                if current is not None:
                    statements.append(([], current))
                current = []
                if it.kind != "merge":
                    current.append((named[it.ins[0]], False, "name"))
            elif current is None:
                current = []
            calls = it.kind == "call" or any(m.kind == "call" for m in it.members)
            current.append((text, it.weighted, "merge" if it.kind == "merge" else "call" if calls else "layer"))
            if it.kind == "split":
                names = [fresh() for _ in it.parts]
                for part, name in zip(it.parts, names):
                    named[part] = name
                statements.append((names, current))
                current = None
            elif it.out in needs:
                named[it.out] = fresh()
                statements.append(([named[it.out]], current))
                current = None
        if current is not None:
            statements.append(([], current))
        if items and items[-1].out != body_out and body_out != body_in:
            statements.append(([], [(named[body_out], False, "name")]))
        if not items:
            statements.append(([], [(in_name, False, "name")]))
        return "\n".join(self.statement_lines(names, els) for names, els in statements)

    @staticmethod
    def statement_lines(names: list[str], elements: list[tuple[str, bool, str]]) -> str:
        """One statement as lines, each a statement of its own (a statement that starts with a layer
        continues from the one before), the names on the last. A line holds one computing layer or call
        (a call without `* n` may take the call after it: a stage's first block and its repeats), the layers
        after a call start a line when they compute, and a long line is broken; never before a merge (at a
        statement's start it would take only the tensors it names) nor after the tensor a line starts from."""
        lines: list[list[str]] = [[]]
        kinds: list[str] = []
        has_weights = False
        width = len(INDENT)
        for e, (text, weighted, kind) in enumerate(elements):
            line = lines[-1]
            after_call = bool(kinds) and kinds[-1] == "call" and kind == "layer" and any(
                w for _, w, _ in _until_call(elements[e:]))
            only_name = len(line) == 1 and elements[0][2] == "name" and len(lines) == 1
            pair = (kind == "call" and len(line) == 1 and kinds[-1] == "call" and " * " not in line[0]
                    and line[0].split("(")[0] != text.split("(")[0])
            if line and kind != "merge" and not only_name and not pair and (
                    kind == "call" or (weighted and has_weights) or after_call or width + len(text) + 4 > WIDTH):
                lines.append([])
                line = lines[-1]
                has_weights = False
                width = len(INDENT)
            line.append(text)
            kinds.append(kind)
            width += len(text) + 4
            has_weights = has_weights or weighted
        label = ", ".join(names) + " = " if names else ""
        return "\n".join(INDENT + (label if k == len(lines) - 1 else "") + " -> ".join(line)
                         for k, line in enumerate(lines))

    # ---- block recovery
    def segments(self) -> list[list[int]]:
        """The nodes between consecutive articulation points, in order: a node no edge jumps over cuts the
        graph, and what lies between two cuts is a region with one input and one output."""
        cuts, reach = [0], 0
        for i, n in enumerate(self.order):
            if i > 0 and reach <= i and (self.op(n).outputs is None or n == self.output):
                cuts.append(i)  # a split stays with its parts, which its statement names
            reach = max([reach] + [self.pos[v] for v, _ in self.consumers[n]])
        return [self.order[a + 1:b + 1] for a, b in zip(cuts, cuts[1:])]

    def key(self, nodes: list[int]) -> tuple:
        """The structure of a run of nodes: ops and edges, inputs from outside as -1; attributes left out."""
        at = {n: i for i, n in enumerate(nodes)}
        return tuple((self.g.nodes[n]["op"], tuple(at.get(u, -1) for u in inputs_of(self.g, n))) for n in nodes)

    def recover(self) -> list[_Block]:
        """Blocks for the regions with a branch inside that occur at least twice, each widened by the
        single layers that follow (then precede) every occurrence alike; an occurrence unlike all the
        others in a kernel size and more (outliers) is left out. Then blocks for the runs of single layers
        that repeat between those blocks (chain_blocks)."""
        live = nx.ancestors(self.g, self.output) | {self.output}
        if len(live) != len(self.order):
            return []  # an unused layer: the regions would not be closed
        tokens = self.segments()
        keys = [self.key(t) for t in tokens]
        classes: dict[tuple, list[int]] = {}
        for i, t in enumerate(tokens):
            if len(t) > 1:
                classes.setdefault(keys[i], []).append(i)
        classes = {k: v for k, v in classes.items() if len(v) >= 2}
        claimed = {i for v in classes.values() for i in v}
        spans = {k: [(i, i) for i in v] for k, v in classes.items()}

        def widen(k: tuple, step: int) -> None:
            while True:
                nxt = [(a - 1, b) if step < 0 else (a, b + 1) for a, b in spans[k]]
                at = [a if step < 0 else b for a, b in nxt]
                if any(j < 0 or j >= len(tokens) or j in claimed or len(tokens[j]) > 1 for j in at):
                    return
                if len({keys[j] for j in at}) != 1:
                    return
                claimed.update(at)
                spans[k] = nxt

        def nodes_of(span_list):
            return [[n for j in range(a, b + 1) for n in tokens[j]] for a, b in span_list]

        for k in classes:
            widen(k, +1)
        for k in classes:
            widen(k, -1)
        for k in classes:
            odd = self.outliers(nodes_of(spans[k]))
            if odd and len(spans[k]) - len(odd) >= 2:
                for a, b in spans[k]:
                    claimed.difference_update(range(a, b + 1))
                classes[k] = [i for x, i in enumerate(classes[k]) if x not in odd]
                claimed.update(classes[k])
                spans[k] = [(i, i) for i in classes[k]]
                widen(k, +1)
                widen(k, -1)
        blocks = []
        used = set(self.block_reserved())
        for k in classes:
            anchor_last = tokens[classes[k][0]][-1]
            name = self.fresh_block_name(f"{self.word(anchor_last)}_block", used)
            b = _Block(name, nodes_of(spans[k]))
            if self.parametrise(b):
                blocks.append(b)
            else:
                used.discard(name)
        return blocks + self.chain_blocks(tokens, keys, claimed, used)

    def outliers(self, instances: list[list[int]]) -> set[int]:
        """The occurrences that alone differ from all the others in two or more attributes, one of them
        an attribute without a default (a kernel size: another layer, as a stem that happens to match)."""
        columns: dict[tuple, bool] = {}  # column of values → whether an attribute without a default has it
        for p, n in enumerate(instances[0]):
            if self.op(n).tensor_args or self.is_part(n):
                continue
            for f, info in self.op(n).attrs.model_fields.items():
                if f != "name":
                    column = tuple(_hashable(self.attrs(inst[p]).get(f)) for inst in instances)
                    columns[column] = columns.get(column, False) or info.is_required()
        alone: Counter = Counter()
        required: set[int] = set()
        for column, req in columns.items():
            counts = Counter(column).most_common()
            if len(counts) == 2 and counts[1][1] == 1 and counts[0][1] >= 2:
                i = column.index(counts[1][0])
                alone[i] += 1
                if req:
                    required.add(i)
        return {i for i, m in alone.items() if m >= 2 and i in required}

    def computes(self, n: int) -> bool:
        ins = [self.g.nodes[u]["shape"] for u in inputs_of(self.g, n)]
        return self.op(n).macs(self.attrs(n), ins, self.g.nodes[n]["shape"]) > 0

    def chain_blocks(self, tokens: list[list[int]], keys: list[tuple], claimed: set[int],
                     used: set[str]) -> list[_Block]:
        """Blocks for runs of single layers between the recovered blocks: a run is cut into chunks, each a
        layer that computes and the layers after it (conv -> bn -> relu6); a sequence of two or more chunks
        that begins or ends a run in several places, with the same ops, becomes a block when that saves
        lines. Runs of one layer repeated exactly are left to `(...) * n`."""
        blocks: list[_Block] = []
        rejected: set[tuple] = set()
        while True:
            runs, run = [], []
            for j, t in enumerate(tokens):
                if len(t) == 1 and j not in claimed:
                    run.append(j)
                    continue
                if run:
                    runs.append(run)
                run = []
            if run:
                runs.append(run)
            chunked = []
            for r in runs:
                chunks: list[list[int]] = []
                for j in r:
                    if not chunks or self.computes(tokens[j][0]):
                        chunks.append([])
                    chunks[-1].append(j)
                chunked.append(chunks)
            found: dict[tuple, list[list[int]]] = {}  # pattern → occurrences (token indices)
            for chunks in chunked:
                for length in range(2, min(8, len(chunks)) + 1):
                    for w in (chunks[:length], chunks[-length:]):  # a run's start, a run's end
                        pattern = tuple(tuple(keys[j] for j in c) for c in w)
                        occ = [j for c in w for j in c]
                        if not any(set(occ) & set(o) for o in found.get(pattern, [])):
                            found.setdefault(pattern, []).append(occ)
            best = None
            for pattern, occurrences in found.items():
                if pattern in rejected or len(occurrences) < 2:
                    continue
                weighted = sum(1 for j in occurrences[0] if self.computes(tokens[j][0]))
                score = (len(occurrences) - 1) * weighted - 2  # lines saved, roughly: one per computing layer
                if weighted >= 2 and score > 0 and (best is None or (score, len(pattern)) > best[0]):
                    best = ((score, len(pattern)), pattern, occurrences)
            if best is None:
                return blocks
            _, pattern, occurrences = best
            instances = [[tokens[j][0] for j in occ] for occ in occurrences]
            odd = self.outliers(instances)
            if len(instances) - len(odd) >= 2:
                occurrences = [o for x, o in enumerate(occurrences) if x not in odd]
                instances = [i for x, i in enumerate(instances) if x not in odd]
            if any(self.uniform(i) for i in instances):
                rejected.add(pattern)
                continue
            first = next(n for n in instances[0] if self.computes(n))
            name = self.fresh_block_name(f"{self.word(first)}_block", used)
            b = _Block(name, instances)
            if not self.parametrise(b):
                used.discard(name)
                rejected.add(pattern)
                continue
            blocks.append(b)
            for occ in occurrences:
                claimed.update(occ)

    def uniform(self, nodes: list[int]) -> bool:
        """Whether the layers that compute are all one layer (conv 64 3x3 pad=1 each time): a repetition."""
        layers = {(self.g.nodes[n]["op"], tuple(self.attrs(n).model_dump(exclude={"name"}).items()))
                  for n in nodes if self.computes(n)}
        return len(layers) == 1

    def block_reserved(self) -> set[str]:
        return set(_RESERVED) | {self.input_name}

    @staticmethod
    def fresh_block_name(base: str, used: set[str]) -> str:
        name = base
        for letter in "bcdefghijklmnopqrstuvwxyz":
            if name not in used and not lookup(name):
                break
            name = f"{base}_{letter}"
        else:
            k = 2
            while f"{base}{k}_" in used:
                k += 1
            name = f"{base}{k}_"
        used.add(name)
        return name

    def parametrise(self, b: _Block) -> bool:
        """Attributes that differ between occurrences become parameters: one per distinct column of values,
        an integer multiple of another written as an expression in it. False where a value that differs
        cannot be passed as an argument (an unset optional attribute: the occurrences stay as layers)."""
        slots: dict[tuple, list[tuple[int, str]]] = {}  # column of values → (position, field) using it
        for p, n in enumerate(b.instances[0]):
            op = self.op(n)
            if op.tensor_args or self.is_part(n):
                continue
            for f in op.attrs.model_fields:
                if f == "name":
                    continue
                column = tuple(_hashable(self.attrs(inst[p]).get(f)) for inst in b.instances)
                if len(set(column)) > 1:
                    if None in column:
                        return False
                    slots.setdefault(column, []).append((p, f))
        used = self.block_reserved() | {b.name}

        def ints(col):
            return all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in col)

        # the smallest columns first, so that multiples are written in terms of them (c, 4*c)
        bases: list[tuple] = []
        derived: dict[tuple, tuple[tuple, str]] = {}  # column → (base column, expression with `{}` for its name)
        for column in sorted(slots, key=lambda c: (not ints(c), c[0] if ints(c) else 0)):
            for base in bases:
                q = column[0] // base[0] if ints(column) and ints(base) else 0
                if q >= 2 and all(x == q * y for x, y in zip(column, base)):
                    derived[column] = (base, f"{q}*{{}}")
                    break
            else:
                bases.append(column)
        field_rank = {}
        for p, n in enumerate(b.instances[0]):
            for i, f in enumerate(self.op(n).attrs.model_fields):
                field_rank[(p, f)] = (p, i)
        first_use = {base: min(field_rank[u] for u in slots[base]) for base in bases}
        for column, (base, _) in derived.items():
            first_use[base] = min(first_use[base], min(field_rank[u] for u in slots[column]))
        params = []  # (column, name, default)
        for column in sorted(bases, key=lambda c: first_use[c]):
            p0, f0 = slots[column][0]
            model = self.op(b.instances[0][p0]).attrs
            table = {_hashable(_default(self.op(b.instances[0][p]).attrs, f)) for p, f in slots[column]}
            # a parameter defaults to the op table's default when some occurrences have it (stride=1)
            default = None
            if len(table) == 1 and (t := table.pop()) is not _NO_DEFAULT and t in column:
                default = attr_text(model, f0, t)
            params.append((column, _param_name(_PARAM_WORDS.get(f0, f0), used), default))
        params.sort(key=lambda x: x[2] is not None)  # required ones first, called by position
        names = {column: name for column, name, _ in params}
        for column, uses in slots.items():
            text = names[column] if column in names else derived[column][1].format(names[derived[column][0]])
            for p, f in uses:
                b.exprs[(p, f)] = text
        b.params = [(name, default) for _, name, default in params]
        for k in range(len(b.instances)):
            args = []
            for column, name, default in params:
                p0, f0 = slots[column][0]
                model = self.op(b.instances[0][p0]).attrs
                text = attr_text(model, f0, self.attrs(b.instances[k][p0]).get(f0))
                args.append(None if default is not None and text == default else text)
            b.args.append(args)
        return True

    def block_text(self, b: _Block) -> str:
        """`block name(params):` and its body, written from the first occurrence with the parameters'
        expressions in place of the values that vary; records the layer names inside an instance."""
        template = b.instances[0]
        at = {n: p for p, n in enumerate(template)}

        def exprs_at(n):
            return {f: e for (p, f), e in b.exprs.items() if p == at[n]}

        items = self.body_items(template, [], exprs_at)
        self.name_items(items, _Namer())
        b.local_names = [self.new_names[n] for n in template]
        body = self.layout(items, self.unit_input(template), "in", template[-1],
                           frozenset(p for p, _ in b.params))
        params = ", ".join(p if d is None else f"{p}={d}" for p, d in b.params)
        return f"block {b.name}({params}):\n{body}"

    def repeat_groups(self, items: list[Item]) -> list[Item]:
        """Consecutive identical calls as one call `* n`; consecutive identical runs of plain layers as
        a group `(a -> b) * n`."""
        out: list[Item] = []
        for it in items:
            last = out[-1] if out else None
            if (it.kind == "call" and last is not None and last.kind == "call" and last.block is it.block
                    and last.args == it.args and it.ins == [last.out]
                    and all(v in set(it.nodes) for v, _ in self.consumers[last.out])):
                last.instances.append(it.nodes)
                last.nodes = last.nodes + it.nodes
                last.out = it.out
                last.text = f"{it.text} * {len(last.instances)}"
                continue
            out.append(it)
        return self.layer_groups(out)

    def layer_groups(self, items: list[Item]) -> list[Item]:
        """Consecutive identical runs of layers and calls, each reading the one before, as `(a -> b) * n`."""
        def linear(a: Item, b: Item) -> bool:
            """b reads a, and only b reads a."""
            inside = set(b.nodes)
            return b.kind in ("layer", "call") and b.ins == [a.out] and all(
                v in inside for v, _ in self.consumers[a.out])

        def same(a: Item, b: Item) -> bool:
            if a.kind == "call" or b.kind == "call":
                return a.kind == b.kind and a.text == b.text
            return self.g.nodes[a.out]["op"] == self.g.nodes[b.out]["op"] and \
                self.attrs(a.out).model_dump(exclude={"name"}) == self.attrs(b.out).model_dump(exclude={"name"})

        def repeats(k: int, length: int) -> int:
            if k + length > len(items) or any(items[k + j].kind not in ("layer", "call") for j in range(length)) \
                    or len(items[k].ins) != 1 \
                    or not all(linear(items[k + j - 1], items[k + j]) for j in range(1, length)):
                return 1
            reps = 1
            while k + (reps + 1) * length <= len(items) and all(
                    linear(items[k + reps * length + j - 1], items[k + reps * length + j])
                    and same(items[k + j], items[k + reps * length + j]) for j in range(length)):
                reps += 1
            return reps

        out: list[Item] = []
        k = 0
        while k < len(items):
            best = (1, 1)
            for length in range(1, 7):
                reps = repeats(k, length)
                run = items[k:k + length]
                # a run of layers that compute starts with one: (conv -> bn -> relu) * 2
                starts_well = run[0].weighted or not any(x.weighted for x in run)
                if reps >= 2 and (length >= 2 or reps >= 3) and starts_well and reps * length > best[0] * best[1]:
                    best = (length, reps)
            length, reps = best
            if reps == 1:
                out.append(items[k])
                k += 1
                continue
            run = items[k:k + length * reps]
            text = "(" + " -> ".join(x.text for x in run[:length]) + f") * {reps}"
            out.append(Item("group", run[-1].out, run[0].ins, text, weighted=True,
                            nodes=[n for x in run for n in x.nodes], members=run))
            k += length * reps
        return out


def _until_call(elements: list[tuple[str, bool, str]]) -> list[tuple[str, bool, str]]:
    out = []
    for e in elements:
        if e[2] == "call":
            break
        out.append(e)
    return out


def _param_name(base: str, used: set[str]) -> str:
    name, k = base, 1
    while name in used or lookup(name):
        k += 1
        name = f"{base}{k}"
    used.add(name)
    return name


def _hashable(v: Any) -> Any:
    """An attribute value as a dictionary key (a JSON plan's lists as tuples)."""
    return tuple(v) if isinstance(v, list) else v


def _identifier(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", s)
    if not s or s[0].isdigit():
        s = "net_" + s
    return s + "_" if s in _RESERVED else s


def _with_shapes(graph: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """The graph with every node's shape: inferred on a copy when the caller's has none yet."""
    if all(graph.nodes[n].get("shape") is not None for n in graph.nodes):
        return graph
    g = graph.copy()
    diags = Diagnostics()
    infer_shapes(g, diags)
    diags.check()
    return g
