"""Build the graph from a parsed program: expand blocks, loops and repeats, resolve names.

Every layer in the source becomes one node per time it runs; every block call becomes an
instance (`bottleneck3`) whose layers are named under it (`bottleneck3.conv2`). Errors are
collected per statement so that independent mistakes are reported together; a statement
that failed poisons the tensor it defines, and later uses of it are skipped silently. A loop
stops at its first iteration with errors: the others would repeat them. Block calls, loops
and groups inside one another are counted against MAX_CALL_DEPTH before each level is entered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from pydantic import ValidationError

from cnnc.dsl import ast
from cnnc.dsl.errors import CnncError, Diagnostics, Span, did_you_mean
from cnnc.dsl.limits import MAX_CALL_DEPTH, MAX_INT, MAX_LAYERS

from .graph import callstack_notes, inputs_of
from .functions import FUNCTIONS
from .ops import OPS, OpDef, lookup, user_op_names



class Symbol(str):
    """A bare word that is not a defined value: `same`, `floor`, `true`, or a tensor name."""


class DimsValue(tuple):
    """`3x3` written in the source."""


@dataclass
class Frame:
    """The scope of one block instance (or of `layers:`)."""

    values: dict[str, Any]
    tensors: dict[str, int | None]
    defaults: dict[str, list[tuple[str, Any, Span]]]
    path: tuple[str, ...] = ()
    callstack: tuple[tuple[str, Span], ...] = ()
    counters: dict[str, int] = field(default_factory=dict)

    def next_name(self, base: str) -> str:
        self.counters[base] = self.counters.get(base, 0) + 1
        sep = "_" if base[-1:].isdigit() else ""  # relu6 → relu6_1, not relu61
        return f"{base}{sep}{self.counters[base]}"


class _Poisoned(Exception):
    """A statement uses a tensor whose definition already failed: nothing more to report."""


class _TooLarge(Exception):
    """The network passed MAX_LAYERS: the build stops, since every later layer would be past it too."""

    def __init__(self, err: CnncError):
        self.err = err


class GraphBuilder:
    def __init__(self, program: ast.Program, diags: Diagnostics):
        self.program = program
        self.diags = diags
        self.g = nx.MultiDiGraph()
        self.names: dict[str, Span] = {}
        self.defaults_by_file: dict[int, dict] = {}
        self.depth = 0  # block calls, loop bodies and groups being expanded, one inside another
        self.assigning = 1  # names the element being built is assigned to
        self.shapes: list = []  # eager output shapes by node id, for `in.channels`

    def enter(self, span: Span) -> None:
        self.depth += 1
        if self.depth > MAX_CALL_DEPTH:
            raise CnncError(f"block calls, loops and groups nest more than {MAX_CALL_DEPTH} levels deep", span,
                            "a chain of blocks calling blocks this long is likely a mistake; flatten it "
                            "with `* N` or a loop")

    # ---- entry
    def build(self) -> nx.MultiDiGraph:
        p, g = self.program, self.g
        whole_file = Span(p.source, 1, 1, 1, 2)
        g.graph["network"] = p.network[0] if p.network else _stem(p.source.name)
        g.graph["source"] = p.source
        g.graph["blocks"] = {}
        consts: dict[str, Any] = {}
        if p.classes:
            classes = self.value_of(p.classes[0], Frame({}, {}, {}))
            if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
                raise CnncError(f"`classes` must be a positive integer, got {classes!r}", p.classes[1])
            consts["classes"] = classes
        g.graph["classes"] = consts.get("classes")
        for name, expr, span in p.constants:  # in order: each may use `classes` and the ones before it
            if name == "classes" or name == "in" or lookup(name) or name in p.blocks:
                raise CnncError(f"`{name}` names a layer, a block or `classes`; choose another name", span)
            value = self.value_of(expr, Frame(dict(consts), {}, {}))
            if isinstance(value, Symbol):
                if value not in ("true", "false"):
                    raise CnncError(f"`{value}` is not defined", expr.span, did_you_mean(value, consts))
                value = value == "true"
            consts[name] = value
        if p.input_dims is None and p.layers is None and p.blocks:
            raise CnncError(f"{p.source.name} holds blocks only: there is no network to check", whole_file,
                            "import it from a network file (`import \"...\"`), or add `input` and `layers:`")
        if p.input_dims is None:
            raise CnncError("no `input` declaration", whole_file, "declare the input size, e.g. `input 3x224x224`")
        dims, dims_span = p.input_dims
        if len(dims) not in (1, 3) or min(dims) < 1:
            raise CnncError(f"input must be C×H×W (or a number of features), got {'x'.join(map(str, dims))}",
                            dims_span)
        if p.layers is None:
            raise CnncError("no `layers:` section", whole_file, "the network's layers go under `layers:`")
        self.consts = consts
        for block in p.blocks.values():
            if lookup(block.name):
                self.diags.add(CnncError(f"block `{block.name}` has the name of a layer", block.name_span,
                                         "choose another name; the layer would be hidden"))
        defaults = self.eval_defaults(p.defaults, consts)
        self.defaults_by_file[id(p.defaults)] = defaults
        x = self.add_node("input", OPS["input"].attrs(dims=dims), [], dims_span, Frame(consts, {}, {}),
                          name=p.input_name)
        g.graph["input"] = x
        frame = Frame(dict(consts), {"in": x, p.input_name: x}, defaults)
        out = self.run_body(p.layers, frame, x)
        g.graph["output"] = out
        return g

    def eval_defaults(self, decls: list[ast.Default], consts) -> dict:
        out: dict[str, list] = {}
        for d in decls:
            op = lookup(d.op)
            if op is None:
                self.diags.add(CnncError(f"unknown layer `{d.op}` in default", d.op_span,
                                         did_you_mean(d.op, user_op_names())))
                continue
            frame = Frame(consts, {}, {})
            for a in d.args:
                if a.name not in op.attrs.model_fields or a.name in ("dims", "name"):
                    self.diags.add(CnncError(f"unknown attribute `{a.name}` for `{op.name}`", a.span,
                                             did_you_mean(a.name, [f for f in op.attrs.model_fields
                                                                   if f not in ("dims", "name")])
                                             or self.usage(op)))
                    continue
                out.setdefault(op.name, []).append((a.name, self.value_of(a.value, frame), a.span))
        return out

    # ---- statements
    def run_body(self, stmts: list[ast.Stmt], frame: Frame, current: int | None) -> int | None:
        for stmt in stmts:
            try:
                current = self.run_stmt(stmt, frame, current)
            except _Poisoned:
                current = None
                if isinstance(stmt, ast.Assign):
                    frame.tensors[stmt.name] = None
            except CnncError as err:
                err.notes.extend(callstack_notes(frame.callstack))
                self.diags.add(err)
                current = None
                if isinstance(stmt, ast.Assign):
                    frame.tensors[stmt.name] = None
        return current

    def run_stmt(self, stmt: ast.Stmt, frame: Frame, current: int | None) -> int | None:
        if isinstance(stmt, ast.Assign):
            if lookup(stmt.name) or stmt.name in self.program.blocks:
                raise CnncError(f"`{stmt.name}` names a layer or block; choose another tensor name", stmt.name_span)
            if stmt.name in frame.values:
                raise CnncError(f"`{stmt.name}` is already a parameter here; choose another tensor name",
                                stmt.name_span)
            names = [(stmt.name, stmt.name_span)] + list(stmt.more)
            for extra, span in stmt.more:
                if lookup(extra) or extra in self.program.blocks or extra in frame.values:
                    raise CnncError(f"`{extra}` names a layer, block or parameter; choose another tensor name", span)
            out, last = current, len(stmt.chain.elements) - 1
            for i, el in enumerate(stmt.chain.elements):
                if i == last:
                    self.assigning = len(names)  # the last layer may be a split into that many
                out = self.run_element(el, frame, out, i == 0)
            if len(names) == 1:
                frame.tensors[stmt.name] = out
                return out
            d = self.g.nodes[out] if out is not None else None
            op = OPS[d["op"]] if d is not None else None
            if op is None or op.outputs is None:
                raise CnncError(f"{len(names)} names for one tensor: only a layer with several outputs (`split`) "
                                "can be assigned to several names", stmt.name_span)
            for i, (name, span) in enumerate(names):
                part_op, attrs = op.part(d["attrs"], i)
                frame.tensors[name] = self.add_node(part_op, OPS[part_op].attrs(**attrs), [out], span, frame,
                                                    name=f"{d['local_name']}_{i}")
            return frame.tensors[names[-1][0]]
        if isinstance(stmt, ast.ChainStmt):
            return self.run_chain(stmt.chain, frame, current)
        if isinstance(stmt, ast.If):
            for cond, body in stmt.branches:
                if self.condition(cond, frame):
                    return self.run_nested(body, frame, current, stmt.span)
            if stmt.orelse is not None:
                return self.run_nested(stmt.orelse, frame, current, stmt.span)
            return current
        if isinstance(stmt, ast.ForEach):
            return self.run_loop(stmt, stmt.names, self.loop_items(stmt, frame), frame, current)
        start = self.eval_int(stmt.start, frame, "range start") if stmt.start is not None else 0
        stop = self.eval_int(stmt.stop, frame, "range stop")
        step = self.eval_int(stmt.step, frame, "range step") if stmt.step is not None else 1
        if step == 0:
            raise CnncError("range step must not be zero", stmt.step.span)
        if len(range(start, stop, step)) > MAX_LAYERS:
            raise CnncError(f"loop of {len(range(start, stop, step))} iterations", stmt.span)
        return self.run_loop(stmt, [stmt.var], [(i,) for i in range(start, stop, step)], frame, current)

    def loop_items(self, stmt: ast.ForEach, frame: Frame) -> list[tuple]:
        """The values each pass of `for a, b in ITEMS:` binds, checked against the number of names."""
        seq = self.tuple_value(stmt.items, frame, "a loop runs over a tuple or `range(...)`",
                               "`for c in (16, 24, 32):` or `for i in range(3):`")
        names = stmt.names
        if len(names) == 1:
            return [(v,) for v in seq]
        rows = []
        for k, row in enumerate(seq):
            if not isinstance(row, tuple) or len(row) != len(names):
                got = (f"{len(row)} value{'s' if len(row) != 1 else ''}" if isinstance(row, tuple)
                       else "not a tuple")
                raise CnncError(f"item {k} of the loop, {_show(row)}, does not unpack into the {len(names)} names "
                                f"{', '.join(names)}: {got}", stmt.items.span)
            rows.append(tuple(row))
        return rows

    def run_loop(self, stmt, names: list[str], passes: list[tuple], frame: Frame,
                 current: int | None) -> int | None:
        """Run a loop body once per pass, the loop names bound to that pass's values (restored after)."""
        for name in names:
            if name in self.program.blocks or lookup(name):
                raise CnncError(f"`{name}` names a layer or block; choose another loop variable", stmt.span)
        saved = {name: frame.values.get(name, _MISSING) for name in names}
        self.enter(stmt.span)
        try:
            for values in passes:
                frame.values.update(zip(names, values))
                before = len(self.diags.errors)
                current = self.run_body(stmt.body, frame, current)
                if len(self.diags.errors) > before:
                    break  # later iterations would report the same mistakes again
        finally:
            self.depth -= 1
            for name, old in saved.items():
                if old is _MISSING:
                    frame.values.pop(name, None)
                else:
                    frame.values[name] = old
        return current

    def run_nested(self, body: list[ast.Stmt], frame: Frame, current: int | None, span: Span) -> int | None:
        """A branch of an `if`: one level deeper, in the same frame (its names stay visible after)."""
        self.enter(span)
        try:
            return self.run_body(body, frame, current)
        finally:
            self.depth -= 1

    def condition(self, e: ast.Expr, frame: Frame) -> bool:
        v = self.value_of(e, frame)
        if isinstance(v, Symbol) and str(v) in ("true", "false"):
            return str(v) == "true"
        if not isinstance(v, bool):
            if isinstance(v, Symbol):
                raise CnncError(f"`{v}` is not defined", e.span, did_you_mean(str(v), frame.values))
            raise CnncError(f"a condition must be true or false, got {_show(v)}", e.span,
                            "compare it: `if s != 1:`, `if c > 64:`")
        return v

    def run_chain(self, chain: ast.Chain, frame: Frame, current: int | None, first: bool = True) -> int | None:
        # after a mistake the rest of the chain is still read, each element checked on its own
        # (names, arguments), so that independent mistakes are reported together
        x, failed, poisoned = current, None, False
        for i, el in enumerate(chain.elements):
            try:
                x = self.run_element(el, frame, x, first and i == 0)
            except _Poisoned:
                x, poisoned = None, True
            except CnncError as err:
                if failed is None:
                    failed = err
                else:
                    err.notes.extend(callstack_notes(frame.callstack))
                    self.diags.add(err)
                x = None
        if failed is not None:
            raise failed
        if poisoned:
            raise _Poisoned()
        return x

    # ---- elements
    def run_element(self, el: ast.Element, frame: Frame, x: int | None, first: bool) -> int | None:
        # the names this element's result is assigned to (a split needs one per part); whatever
        # it contains (groups, block bodies) is assigned to nothing directly
        assigning, self.assigning = self.assigning, 1
        if isinstance(el, ast.Group):
            times = self.repeat_count(el.repeat, frame)
            self.enter(el.span)
            try:
                for r in range(times):
                    x = self.run_chain(el.chain, frame, x, first and r == 0)
            finally:
                self.depth -= 1
            return x
        name = el.name
        if isinstance(el, ast.Command) and not el.args and name in frame.tensors and not lookup(name):
            if not first:
                raise CnncError(f"tensor `{name}` in the middle of a chain", el.span,
                                f"a chain can start from `{name}` (`{name} -> ...`); to merge it use "
                                f"`add({name})` or `concat(..., {name})`")
            return self.tensor(name, frame, el.span)
        bound = frame.values.get(name)
        if isinstance(bound, Symbol) and name not in frame.tensors and not lookup(name):
            # a parameter holding a layer or block: `block b(act=relu)`, then `-> act`
            if not (lookup(bound) or bound in self.program.blocks):
                raise CnncError(f"`{name}` is `{bound}` here, which is not a layer or block", el.name_span,
                                did_you_mean(str(bound), list(user_op_names()) + list(self.program.blocks)))
            name = str(bound)
        if name in self.program.blocks:
            times = self.repeat_count(el.repeat if isinstance(el, ast.Call) else None, frame)
            for _ in range(times):
                x = self.call_block(self.program.blocks[name], el, frame, x)
            return x
        op = lookup(name)
        if op is None:
            known = list(user_op_names()) + list(self.program.blocks) + [t for t in frame.tensors]
            kind = "layer, block or tensor" if isinstance(el, ast.Command) else "layer or block"
            raise CnncError(f"unknown {kind} `{name}`", el.name_span,
                            did_you_mean(name, known, lambda c: lookup(c).name if lookup(c) else c))
        if isinstance(el, ast.Call) and el.repeat is not None:
            raise CnncError("repetition `* N` applies to a block call or a parenthesised chain", el.repeat.span,
                            f"write `({name}(...) -> ...) * N` to repeat layers")
        if op.tensor_args:
            return self.merge(op, el, frame, x, first)
        attrs = self.make_attrs(op, el, frame)  # before the poison check: its mistakes are this line's own
        if op.outputs is not None and op.outputs(attrs) != assigning:
            n = op.outputs(attrs)
            names = ", ".join("abcdefgh"[i] if i < 8 else f"t{i}" for i in range(n))
            raise CnncError(f"`{name}` gives {n} tensors; name each of them", el.span,
                            f"`{names} = ... -> {name} {n}`, then use them by name")
        if x is None:
            raise _Poisoned()
        return self.add_node(op.name, attrs, [x], el.span, frame, base=name)

    def tensor(self, name: str, frame: Frame, span: Span) -> int:
        if name not in frame.tensors:
            raise CnncError(f"unknown tensor `{name}`", span, did_you_mean(name, frame.tensors))
        t = frame.tensors[name]
        if t is None:
            raise _Poisoned()
        return t

    def merge(self, op: OpDef, el, frame: Frame, x: int | None, first: bool) -> int:
        operands: list[int | None] = [] if first else [x]
        for a in el.args:
            if a.name is not None:
                raise CnncError(f"`{op.name}` takes tensor names only, not `{a.name}=`", a.span)
            if not isinstance(a.value, ast.Var):
                raise CnncError(f"`{op.name}` takes tensor names, not expressions", a.span)
            if a.value.name not in frame.tensors:
                raise CnncError(f"unknown tensor `{a.value.name}`", a.value.span,
                                did_you_mean(a.value.name, frame.tensors))
            operands.append(frame.tensors[a.value.name])
        lo, _ = op.inputs
        if len(operands) < lo:
            raise CnncError(f"`{op.name}` needs at least {lo} tensors, got {len(operands)}", el.span,
                            f"inside a chain the flowing tensor comes first: `... -> {op.name}(shortcut)`")
        if any(o is None for o in operands):
            raise _Poisoned()
        return self.add_node(op.name, op.attrs(), operands, el.span, frame, base=el.name)

    def make_attrs(self, op: OpDef, el, frame: Frame):
        given: dict[str, tuple[Any, Span]] = {}
        for name, value, span in frame.defaults.get(op.name, []):
            given[name] = (value, span)
        fields = op.attrs.model_fields
        explicit: set[str] = set()
        positional = [a for a in el.args if a.name is None]
        if len(positional) > len(op.positional):
            extra = positional[len(op.positional)]
            takes = ", ".join(op.positional) if op.positional else "none"
            raise CnncError(f"`{op.name}` takes {len(op.positional)} positional argument(s) ({takes}), "
                            f"got {len(positional)}", extra.span, self.usage(op))
        for field_name, a in zip(op.positional, positional):
            given[field_name] = (self.value_of(a.value, frame), a.span)
            explicit.add(field_name)
        for a in el.args:
            if a.name is None:
                continue
            if a.name not in fields or a.name == "dims":
                raise CnncError(f"unknown attribute `{a.name}` for `{op.name}`", a.span,
                                did_you_mean(a.name, [f for f in fields if f != "dims"]) or self.usage(op))
            if a.name in explicit:
                raise CnncError(f"`{a.name}` given twice", a.span)
            explicit.add(a.name)
            given[a.name] = (self.value_of(a.value, frame), a.span)
        missing = [f for f, info in fields.items() if info.is_required() and f not in given]
        if missing:
            raise CnncError(f"`{op.name}` needs `{missing[0]}`", el.span, self.usage(op))
        try:
            return op.attrs(**{k: v for k, (v, _) in given.items()})
        except ValidationError as exc:
            first_err = exc.errors()[0]
            fname = str(first_err["loc"][0]) if first_err["loc"] else ""
            value, span = given.get(fname, (None, el.span))
            raise self.type_error(op, fname, value, span, first_err, frame) from None

    def type_error(self, op: OpDef, fname: str, value, span: Span, err: dict, frame: Frame) -> CnncError:
        numeric = err["type"].startswith(("int_", "float_", "greater", "less", "tuple_", "bool_"))
        if isinstance(value, Symbol) and numeric and value not in _WORDS:
            known = [k for k, v in frame.values.items() if isinstance(v, (int, float))]
            return CnncError(f"`{value}` is not defined", span, did_you_mean(value, known) or self.usage(op))
        msg = err["msg"].split(", got ")[0]
        if msg.startswith("Value error, "):  # the words of our own validators in ops.py
            msg = msg[len("Value error, "):]
        elif msg.startswith("Input should be "):
            msg = "should be " + msg[len("Input should be "):]
        else:
            msg = msg[0].lower() + msg[1:]
        if err["type"] == "literal_error" and isinstance(value, str):
            hint = did_you_mean(value, err["ctx"]["expected"].replace("'", "").replace(" or ", ", ").split(", "))
            return CnncError(f"`{fname}` of `{op.name}` {msg}, got {value}", span, hint or self.usage(op))
        shown = "x".join(map(str, value)) if isinstance(value, DimsValue) else (
            str(value) if isinstance(value, Symbol) else repr(value))
        return CnncError(f"wrong argument type: `{fname}` of `{op.name}` {msg}, got {shown}", span,
                         self.usage(op))

    @staticmethod
    def usage(op: OpDef) -> str:
        fields = op.attrs.model_fields
        parts = [f"<{p}>" for p in op.positional]
        for f, info in fields.items():
            if f in op.positional or f in ("name", "trainable", "lr_mult", "decay_mult", "dims"):
                continue
            default = info.default
            if isinstance(default, tuple) and len(set(default)) == 1:
                default = default[0]
            parts.append(f"{f}={_show(default)}")
        return f"usage: {op.name} " + " ".join(parts)

    # ---- blocks
    def call_block(self, block: ast.BlockDef, el, frame: Frame, x: int | None) -> int | None:
        stack = [name for name, _ in frame.callstack]
        if block.name in stack:
            chain = " → ".join(stack[stack.index(block.name):] + [block.name])
            raise CnncError(f"recursive block: {chain}", el.name_span,
                            "blocks cannot call themselves; repeat with `* N` or `for i in range(N):`")
        values = self.bind(block, el.args, frame, el, x)
        inst = frame.next_name(block.name)
        path = frame.path + (inst,)
        self.g.graph["blocks"][path] = {"block": block.name, "args": values, "span": el.span,
                                        "def": block.name_span, "callstack": frame.callstack}
        child = Frame({**self.consts, **values}, {"in": x}, self.block_defaults(block),
                      path, frame.callstack + ((block.name, el.span),))
        self.enter(el.span)
        try:
            out = self.run_body(block.body, child, x)  # with x None too: reports the body's own mistakes
        finally:
            self.depth -= 1
        if x is None or out is None:
            raise _Poisoned()
        self.g.graph["blocks"][path]["output"] = out
        return out

    def block_defaults(self, block: ast.BlockDef) -> dict:
        """The `default` statements of the file the block is written in, evaluated once per file."""
        key = id(block.defaults)
        if key not in self.defaults_by_file:
            self.defaults_by_file[key] = self.eval_defaults(block.defaults, self.consts)
        return self.defaults_by_file[key]

    def bind(self, block: ast.BlockDef, args: list[ast.Arg], frame: Frame, el, x: int | None = None
             ) -> dict[str, Any]:
        params = [p.name for p in block.params]
        values: dict[str, Any] = {}
        positional = [a for a in args if a.name is None]
        if len(positional) > len(params):
            raise CnncError(f"block `{block.name}` takes {len(params)} argument(s), got {len(positional)}",
                            positional[len(params)].span).with_note(block.span, "defined here")
        for p, a in zip(params, positional):
            values[p] = self.value_of(a.value, frame)
        for a in args:
            if a.name is None:
                continue
            if a.name not in params:
                raise CnncError(f"block `{block.name}` has no parameter `{a.name}`", a.span,
                                did_you_mean(a.name, params)).with_note(block.span, "defined here")
            if a.name in values:
                raise CnncError(f"argument `{a.name}` given twice", a.span)
            values[a.name] = self.value_of(a.value, frame)
        for p in block.params:
            if p.name in values:
                continue
            if p.default is None:
                raise CnncError(f"block `{block.name}` called without argument `{p.name}`", el.span).with_note(
                    p.span, "parameter declared here")
            # a default may read the block's input: `block se(c=in.channels)`
            values[p.name] = self.value_of(p.default, Frame({**self.consts, **values}, {"in": x}, {}))
        return {p: values[p] for p in params}  # in declaration order

    # ---- expressions
    def repeat_count(self, expr: ast.Expr | None, frame: Frame) -> int:
        if expr is None:
            return 1
        n = self.eval_int(expr, frame, "repeat count")
        if n < 0 or n > MAX_LAYERS:  # 0: not at all (a stage of `n - 1` further blocks with n = 1)
            raise CnncError(f"repeat count must be between 0 and {MAX_LAYERS}, got {n}", expr.span)
        return n

    def eval_int(self, expr: ast.Expr, frame: Frame, what: str) -> int:
        v = self.defined(expr, frame)
        if not isinstance(v, int) or isinstance(v, bool):
            raise CnncError(f"{what} must be an integer, got {_show(v)}", expr.span)
        return v

    def value_of(self, e: ast.Expr, frame: Frame) -> Any:
        if isinstance(e, ast.Num):
            return e.value
        if isinstance(e, ast.Str):
            return e.value
        if isinstance(e, ast.Var):
            if e.name in frame.values:
                return frame.values[e.name]
            return Symbol(e.name)
        if isinstance(e, ast.Dims):
            return DimsValue(e.values)
        if isinstance(e, ast.TupleExpr):
            return tuple(self.value_of(i, frame) for i in e.items)
        if isinstance(e, ast.Neg):
            v = self.number(e.operand, frame)
            return -v
        if isinstance(e, ast.Func):
            return self.call_function(e, frame)
        if isinstance(e, ast.Compare):
            return self.compare(e, frame)
        if isinstance(e, ast.ShapeOf):
            return self.size_of(e, frame)
        if isinstance(e, ast.Index):
            return self.index(e, frame)
        if isinstance(e, ast.Logic):  # short-circuit, as Python: `c > 0 and 64 // c > 2` is safe
            left = self.condition(e.left, frame)
            if e.op == "not":
                return not left
            if (e.op == "and" and not left) or (e.op == "or" and left):
                return left
            return self.condition(e.right, frame)
        a, b = self.number(e.left, frame, e.op), self.number(e.right, frame, e.op)
        if e.op in ("//", "%", "/") and b == 0:
            raise CnncError("division by zero", e.span)
        if e.op == "+":
            v = a + b
        elif e.op == "-":
            v = a - b
        elif e.op == "*":
            v = a * b
        elif e.op == "//":
            v = a // b
        elif e.op == "%":
            v = a % b
        elif isinstance(a, int) and isinstance(b, int) and a % b == 0:
            v = a // b  # "/": exact quotients of integers stay integers
        else:
            v = a / b
        return bounded(v, e.span)

    def size_of(self, e: ast.ShapeOf, frame: Frame) -> int:
        """`in.channels`, `x.height`, `x.width`, `x.features`: from the shapes of the layers so far."""
        if e.field not in SIZES:
            raise CnncError(f"a tensor has no `{e.field}`", e.field_span,
                            did_you_mean(e.field, SIZES) or "sizes: " + ", ".join(SIZES))
        shape = self.eager_shape(self.tensor(e.tensor, frame, e.tensor_span))
        if shape is None:  # a layer before it has a shape mistake: infer_shapes reports that one
            raise _Poisoned()
        if e.field == "features":
            return math.prod(shape)
        axis = SIZES[e.field]
        if axis >= len(shape):
            raise CnncError(f"`{e.tensor}` is flat ({shape[0]} features): it has no {e.field}", e.span,
                            f"use `{e.tensor}.channels` or `{e.tensor}.features`")
        return shape[axis]

    def eager_shape(self, n: int):
        """The output shape of node n by the op table's rules, or None where a rule fails (node ids
        are in build order, so inputs come first; shapes are kept for the next question)."""
        for m in range(len(self.shapes), n + 1):
            d = self.g.nodes[m]
            ins = [self.shapes[u] for u in inputs_of(self.g, m)]
            shape = None
            if all(s is not None for s in ins):
                try:
                    shape = tuple(OPS[d["op"]].shape(d["attrs"], ins))
                except CnncError:
                    shape = None
            self.shapes.append(shape)
        return self.shapes[n]

    def compare(self, e: ast.Compare, frame: Frame) -> bool:
        a, b = self.value_of(e.left, frame), self.value_of(e.right, frame)
        for v, side in ((a, e.left), (b, e.right)):
            if isinstance(v, Symbol) and str(v) not in _WORDS:
                raise CnncError(f"`{v}` is not defined", side.span, did_you_mean(str(v), frame.values))
        if e.op in ("==", "!="):
            same = (a == b) if type(a) is type(b) or all(isinstance(v, (int, float)) for v in (a, b)) else False
            return same if e.op == "==" else not same
        for v, side in ((a, e.left), (b, e.right)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CnncError(f"`{e.op}` compares numbers, got {_show(v)}", side.span)
        return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[e.op]

    def call_function(self, e: ast.Func, frame: Frame) -> int | float:
        f = FUNCTIONS.get(e.name)
        if f is None:
            hint = did_you_mean(e.name, FUNCTIONS) or "functions: " + ", ".join(FUNCTIONS)
            if lookup(e.name) or e.name in self.program.blocks:
                hint = f"`{e.name}` is a layer or block; an expression may call " + ", ".join(FUNCTIONS)
            raise CnncError(f"unknown function `{e.name}`", e.name_span, hint)
        n = len(e.args)
        if n < f.least or (f.most is not None and n > f.most):
            want = (f"{f.least}" if f.most == f.least else f"{f.least} or more" if f.most is None
                    else f"{f.least} to {f.most}")
            raise CnncError(f"`{e.name}` takes {want} argument{'s' if want != '1' else ''}, got {n}", e.span,
                            f"usage: {f.usage}")
        args = [self.tuple_value(a, frame, "a tuple or a size is needed here") if f.sequence
                else self.number(a, frame) for a in e.args]
        try:
            v = f.fn(*args)
        except (ValueError, OverflowError, TypeError) as exc:
            raise CnncError(f"`{e.name}`: {exc}", e.span, f"usage: {f.usage}") from None
        return bounded(v, e.span)

    def index(self, e: ast.Index, frame: Frame) -> Any:
        seq = self.tuple_value(e.target, frame, "only a tuple or a size can be indexed")
        i = self.eval_int(e.index, frame, "an index")
        if not -len(seq) <= i < len(seq):
            raise CnncError(f"index {i} is out of range for {_show(seq)}, which has {len(seq)} "
                            f"item{'s' if len(seq) != 1 else ''}", e.index.span,
                            f"indices run from 0 to {len(seq) - 1} (or from -{len(seq)} to -1 from the end)")
        return seq[i]

    def defined(self, e: ast.Expr, frame: Frame) -> Any:
        """The value of `e`; a bare word that names nothing here is an error, with a suggestion."""
        v = self.value_of(e, frame)
        if isinstance(v, Symbol):
            raise CnncError(f"`{v}` is not defined", e.span, did_you_mean(v, frame.values))
        return v

    def tuple_value(self, e: ast.Expr, frame: Frame, needed: str, hint: str | None = None) -> tuple:
        """The value of `e`, which must be a tuple or a size (`needed` says why, in the error)."""
        v = self.defined(e, frame)
        if not isinstance(v, tuple):
            raise CnncError(f"{needed}, got {_show(v)}", e.span, hint)
        return v

    def number(self, e: ast.Expr, frame: Frame, op: str | None = None) -> int | float:
        v = self.defined(e, frame)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            hint = None
            if isinstance(v, DimsValue) and op == "*":
                hint = ("repetition `* N` applies to a block call or a parenthesised chain: "
                        "`(conv 64 3x3 -> relu) * 2`")
            elif isinstance(v, tuple):  # a size such as 3x3, or a tuple: arithmetic works on its items
                hint = (f"{_show(v)} is not a number: write a number (`3//2`), take an item with `[i]` "
                        f"(`{_show(v)}[0]` is {_show(v[0])})")
                if isinstance(v, DimsValue) and op in ("//", "/"):
                    hint += ", or write `pad=same` for the padding that keeps a window's output size"
            raise CnncError(f"arithmetic needs numbers, got {_show(v)}", e.span, hint)
        return v

    # ---- nodes
    def add_node(self, op: str, attrs, inputs: list[int], span: Span, frame: Frame, name: str | None = None,
                 base: str | None = None) -> int:
        """Add one node; unnamed layers are numbered per the word written (`bn` → bn1, bn2, ...)."""
        g = self.g
        if g.number_of_nodes() >= MAX_LAYERS:
            raise _TooLarge(CnncError(f"the network expands to more than {MAX_LAYERS} layers", span,
                                      "a network this deep is likely a runaway loop or repeat"))
        local = name or attrs.get("name", None) or frame.next_name(base or op)
        full = ".".join(frame.path + (local,))
        if full in self.names:
            raise CnncError(f"layer name `{full}` is used twice", span).with_note(self.names[full], "first used here")
        self.names[full] = span
        n = g.number_of_nodes()
        g.add_node(n, op=op, attrs=attrs, name=full, local_name=local, span=span, callstack=frame.callstack,
                   path=frame.path)
        for port, u in enumerate(inputs):
            g.add_edge(u, n, port=port)
        return n


def bounded(v: int | float, span: Span) -> int | float:
    """An arithmetic result within the language's number range (limits.MAX_INT, finite floats)."""
    if isinstance(v, int) and abs(v) > MAX_INT:
        raise CnncError(f"the result is too large: integers go up to {MAX_INT:.0e}".replace("e+", "e"), span)
    if isinstance(v, float) and not math.isfinite(v):
        raise CnncError("the result is too large for a float", span)
    return v


_MISSING = object()
SIZES = {"channels": 0, "height": 1, "width": 2, "features": None}  # what `x.SIZE` may ask
_WORDS = {"true", "false", "same", "valid", "exact", "floor", "ceil"}  # words attributes take


def _show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, DimsValue):
        return "x".join(map(str, v))
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, float) and math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return f"{v:g}"
    return str(v)


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".cnn") else base


def build_graph(program: ast.Program, diags: Diagnostics) -> nx.MultiDiGraph:
    """Pass 1: syntax tree → graph. Errors go to `diags`; the graph may hold poisoned gaps then."""
    try:
        return GraphBuilder(program, diags).build()
    except CnncError as err:
        diags.add(err)
        return None
    except _TooLarge as stop:
        diags.add(stop.err)
        return None
