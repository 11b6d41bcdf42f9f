"""The syntax tree of a `.cnn` file: plain dataclasses, each with the `Span` it came from.

The parser builds these; the compiler's graph builder expands blocks, loops and repeats
over them. Nothing here knows which layers exist: that is the op table's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .errors import Source, Span


# ---- expressions -------------------------------------------------------------------------

@dataclass
class Num:
    value: int | float
    span: Span


@dataclass
class Var:
    name: str
    span: Span


@dataclass
class Str:
    value: str
    span: Span


@dataclass
class Dims:
    """`3x3`, `1x7`, `3x224x224`: sizes separated by x."""

    values: tuple[int, ...]
    span: Span


@dataclass
class TupleExpr:
    items: list["Expr"]
    span: Span


@dataclass
class BinOp:
    op: str  # one of + - * // / %
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass
class Neg:
    operand: "Expr"
    span: Span


@dataclass
class Func:
    """`max(a, b)`, `make_divisible(x, 8)`: a function of numbers."""

    name: str
    args: list["Expr"]
    span: Span
    name_span: Span


@dataclass
class Index:
    """`t[i]`: an item of a tuple or a size."""

    target: "Expr"
    index: "Expr"
    span: Span


@dataclass
class Compare:
    op: str  # one of == != < > <= >=
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass
class ShapeOf:
    """`in.channels`, `x.height`: a size of a tensor, known once the layers before it are."""

    tensor: str
    field: str
    span: Span
    tensor_span: Span
    field_span: Span


@dataclass
class Logic:
    """`a and b`, `a or b`, `not a` (then right is None) of conditions."""

    op: str  # "and", "or" or "not"
    left: "Expr"
    right: "Expr | None"
    span: Span


Expr = Union[Num, Var, Str, Dims, TupleExpr, BinOp, Neg, Func, Compare, ShapeOf, Logic, Index]


# ---- chains ------------------------------------------------------------------------------

@dataclass
class Arg:
    """A positional (name is None) or keyword argument."""

    name: str | None
    value: Expr
    span: Span


@dataclass
class Command:
    """`conv 64 3x3 stride=2`: a layer (or, without arguments, a tensor name or block)."""

    name: str
    args: list[Arg]
    span: Span
    name_span: Span


@dataclass
class Call:
    """`bottleneck(64, stride=2) * 3`, `add(in)`, `concat(a, b)`."""

    name: str
    args: list[Arg]
    repeat: Expr | None
    span: Span
    name_span: Span


@dataclass
class Group:
    """`(conv 64 3x3 -> relu) * 2`."""

    chain: "Chain"
    repeat: Expr | None
    span: Span


Element = Union[Command, Call, Group]


@dataclass
class Chain:
    elements: list[Element]
    span: Span


@dataclass
class Assign:
    name: str
    chain: Chain
    span: Span
    name_span: Span
    more: list = field(default_factory=list)  # further (name, span) pairs: the parts of a split


@dataclass
class ChainStmt:
    chain: Chain
    span: Span


@dataclass
class For:
    var: str
    start: Expr | None
    stop: Expr
    body: list["Stmt"]
    span: Span
    step: Expr | None = None


@dataclass
class ForEach:
    """`for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2)):` one pass per item, unpacked into the names."""

    names: list[str]
    items: Expr
    body: list["Stmt"]
    span: Span


@dataclass
class If:
    """`if cond:` body, then `elif cond:` bodies, then an optional `else:` body."""

    branches: list[tuple[Expr, list["Stmt"]]]  # (condition, body) in order
    orelse: list["Stmt"] | None
    span: Span


Stmt = Union[Assign, ChainStmt, For, ForEach, If]


# ---- top level ---------------------------------------------------------------------------

@dataclass
class Param:
    name: str
    default: Expr | None
    span: Span


@dataclass
class Default:
    """`default conv bias=false round=floor`: attribute defaults for one layer kind in this file."""

    op: str
    args: list[Arg]
    span: Span
    op_span: Span


@dataclass
class BlockDef:
    name: str
    params: list[Param]
    body: list[Stmt]
    span: Span
    name_span: Span
    defaults: list[Default] = field(default_factory=list)  # of the file the block is written in


@dataclass
class Setting:
    """One line of the train section: `lr 0.1 policy=step gamma=0.1`."""

    name: str
    args: list[Arg]
    span: Span
    name_span: Span


@dataclass
class Import:
    path: str
    span: Span


@dataclass
class Program:
    """One parsed file. `blocks` includes those brought in by imports (see dsl.loader)."""

    source: Source
    network: tuple[str, Span] | None = None
    input_name: str = "input"
    input_dims: tuple[tuple[int, ...], Span] | None = None
    classes: tuple[Expr, Span] | None = None
    imports: list[Import] = field(default_factory=list)
    defaults: list[Default] = field(default_factory=list)
    blocks: dict[str, BlockDef] = field(default_factory=dict)
    layers: list[Stmt] | None = None
    layers_span: Span | None = None
    constants: list[tuple[str, Expr, Span]] = field(default_factory=list)  # `width = 1.0`, in order
    train: list[Setting] | None = None
    train_span: Span | None = None
