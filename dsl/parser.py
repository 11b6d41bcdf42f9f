"""Parse `.cnn` text into a `dsl.ast.Program`.

Lark (LALR + contextual lexer + an Indenter for block structure) builds the tree; a
Transformer turns it into AST dataclasses with spans. Lark's exceptions become `CnncError`
with the file, line, column and what was expected; a `CnncError` raised inside the
Transformer arrives wrapped in `VisitError` and is unwrapped here.

The LALR tables are built in memory once per process, never cached on disk: Lark's cache is a
pickle under a predictable name in the shared temp directory, which anyone could plant.
Before the tree is turned into an AST its nesting is measured without recursion
(`limits.MAX_NESTING`), so no input reaches Python's recursion limit.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (UnexpectedCharacters, UnexpectedEOF, UnexpectedInput,
                             UnexpectedToken, VisitError)
from lark.indenter import DedentError, Indenter

from . import ast
from .errors import CnncError, InternalError, Source, Span
from .limits import MAX_INT, MAX_NESTING, MAX_NUMBER_DIGITS, MAX_SOURCE_BYTES

GRAMMAR = Path(__file__).with_name("cnn.lark")


class _CnnIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR"]
    CLOSE_PAREN_types = ["RPAR"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 4


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    # no cache=True: see the module docstring (building the tables takes about 0.1 s)
    return Lark(GRAMMAR.read_text(encoding="utf-8"), parser="lalr", postlex=_CnnIndenter(),
                propagate_positions=True, maybe_placeholders=True, cache=False)


# Friendly names for terminals in "expected ..." messages.
_TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "DIMS": "sizes like 3x3", "STRING": "a quoted string",
    "_NL": "end of line", "_INDENT": "an indented line", "_DEDENT": "end of an indented section",
    "LPAR": "`(`", "RPAR": "`)`", "COMMA": "`,`", "EQUAL": "`=`", "COLON": "`:`", "_ARROW": "`->`",
    "STAR": "`*`", "PLUS": "`+`", "MINUS": "`-`", "SLASH": "`/`", "__ANON_0": "`//`",
    "PERCENT": "`%`", "$END": "end of file",
}


def _describe(term: str) -> str:
    if term in _TOKEN_NAMES:
        return _TOKEN_NAMES[term]
    try:
        pattern = _lark().get_terminal(term).pattern
        if pattern.type == "str":
            return f"`{pattern.value}`"
    except KeyError:
        pass
    return term.lower()


class _ToAst(Transformer):
    """Lark tree → AST. Spans come from the rule's meta (propagate_positions)."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span:
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, tok: Token) -> Span:
        return Span(self.source, tok.line, tok.column, tok.end_line, tok.end_column)

    # ---- expressions
    @v_args(meta=True)
    def number(self, meta, children):
        (tok,) = children
        return ast.Num(_number(str(tok), self._tok(tok)), self._tok(tok))

    def var(self, children):
        (tok,) = children
        return ast.Var(str(tok), self._tok(tok))

    def string(self, children):
        (tok,) = children
        return ast.Str(str(tok)[1:-1], self._tok(tok))

    def dims(self, children):
        (tok,) = children
        parts = str(tok).replace("×", "x").split("x")
        return ast.Dims(tuple(_number(p, self._tok(tok)) for p in parts), self._tok(tok))

    @v_args(meta=True)
    def tuple(self, meta, children):
        return ast.TupleExpr([c for c in children if c is not None], self._span(meta))

    def _binop(op):  # noqa: N805 - a factory for the methods below
        @v_args(meta=True)
        def method(self, meta, children):
            left, right = children
            return ast.BinOp(op, left, right, self._span(meta))
        return method

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    floordiv = _binop("//")
    div = _binop("/")
    mod = _binop("%")

    @v_args(meta=True)
    def neg(self, meta, children):
        return ast.Neg(children[0], self._span(meta))

    @v_args(meta=True)
    def index(self, meta, children):
        target, index = children
        return ast.Index(target, index, self._span(meta))

    @v_args(meta=True)
    def shape_of(self, meta, children):
        tensor, field = children
        return ast.ShapeOf(str(tensor), str(field), self._span(meta), self._tok(tensor), self._tok(field))

    @v_args(meta=True)
    def or_(self, meta, children):
        return ast.Logic("or", children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def and_(self, meta, children):
        return ast.Logic("and", children[0], children[1], self._span(meta))

    @v_args(meta=True)
    def not_(self, meta, children):
        return ast.Logic("not", children[0], None, self._span(meta))

    @v_args(meta=True)
    def compare(self, meta, children):
        left, op, right = children
        return ast.Compare(str(op), left, right, self._span(meta))

    @v_args(meta=True)
    def func(self, meta, children):
        name, *args = children
        return ast.Func(str(name), [a for a in args if a is not None], self._span(meta), self._tok(name))

    # ---- arguments and chains
    def _args(self, children) -> list[ast.Arg]:
        out = []
        for c in children:
            if c is None:
                continue
            out.append(c if isinstance(c, ast.Arg) else ast.Arg(None, c, c.span))
        return out

    @v_args(meta=True)
    def kwarg(self, meta, children):
        name, value = children
        return ast.Arg(str(name), value, self._span(meta))

    @v_args(meta=True)
    def repeat(self, meta, children):
        return children[0]

    @v_args(meta=True)
    def command(self, meta, children):
        name, *args = children
        return ast.Command(str(name), self._args(args), self._span(meta), self._tok(name))

    @v_args(meta=True)
    def call(self, meta, children):
        name, *rest = children
        repeat = rest.pop() if rest else None
        return ast.Call(str(name), self._args(rest), repeat, self._span(meta), self._tok(name))

    @v_args(meta=True)
    def group(self, meta, children):
        chain, repeat = children
        return ast.Group(chain, repeat, self._span(meta))

    @v_args(meta=True)
    def chain(self, meta, children):
        return ast.Chain(list(children), self._span(meta))

    # ---- statements
    @v_args(meta=True)
    def assign(self, meta, children):
        *names, chain = children
        more = [(str(n), self._tok(n)) for n in names[1:]]  # `a, b = ... -> split 2`
        return ast.Assign(str(names[0]), chain, self._span(meta), self._tok(names[0]), more)

    @v_args(meta=True)
    def chain_stmt(self, meta, children):
        return ast.ChainStmt(children[0], self._span(meta))

    @v_args(meta=True)
    def for_stmt(self, meta, children):
        var, first, second, third, body = children
        start, stop = (first, second) if second is not None else (None, first)
        header = Span(self.source, meta.line, meta.column, meta.line, 10**6)
        return ast.For(str(var), start, stop, body, header, third)

    @v_args(meta=True)
    def for_each(self, meta, children):
        *names, items, body = children
        header = Span(self.source, meta.line, meta.column, meta.line, 10**6)
        return ast.ForEach([str(n) for n in names], items, body, header)

    @v_args(meta=True)
    def if_stmt(self, meta, children):
        cond, body, *rest = children
        orelse = rest.pop() if rest and not isinstance(rest[-1], tuple) else None
        header = Span(self.source, meta.line, meta.column, meta.line, 10**6)
        return ast.If([(cond, body)] + [r for r in rest if r is not None], orelse, header)

    def elif_part(self, children):
        cond, body = children
        return (cond, body)

    def body(self, children):
        return list(children)

    # ---- top level
    @v_args(meta=True)
    def param(self, meta, children):
        name, default = children
        return ast.Param(str(name), default, self._span(meta))

    @v_args(meta=True)
    def block_def(self, meta, children):
        name, *params, body = children
        header = Span(self.source, meta.line, meta.column, meta.line, 10**6)
        return ast.BlockDef(str(name), [p for p in params if p is not None], body, header, self._tok(name))

    @v_args(meta=True)
    def setting(self, meta, children):
        name, *args = children
        return ast.Setting(str(name), self._args(args), self._span(meta), self._tok(name))

    @v_args(meta=True)
    def default_decl(self, meta, children):
        op, *args = children
        return ast.Default(str(op), self._args(args), self._span(meta), self._tok(op))

    @v_args(meta=True)
    def start(self, meta, children):
        prog = ast.Program(self.source)
        seen: dict[str, Span] = {}

        def once(key: str, span: Span) -> None:
            if key in seen:
                raise CnncError(f"`{key}` is declared twice", span).with_note(seen[key], "first declared here")
            seen[key] = span

        for item in children:
            kind, meta_, payload = item if isinstance(item, tuple) else (None, None, item)
            if isinstance(payload, ast.BlockDef):
                if payload.name in prog.blocks:
                    raise CnncError(f"block `{payload.name}` is defined twice", payload.name_span).with_note(
                        prog.blocks[payload.name].name_span, "first defined here")
                prog.blocks[payload.name] = payload
            elif isinstance(payload, ast.Default):
                prog.defaults.append(payload)
            elif isinstance(payload, ast.Import):
                prog.imports.append(payload)
            elif kind == "network":
                once("network", meta_)
                prog.network = (payload, meta_)
            elif kind == "input":
                once("input", meta_)
                name, dims = payload
                prog.input_name = name or "input"
                prog.input_dims = (dims.values, dims.span)
            elif kind == "classes":
                once("classes", meta_)
                prog.classes = (payload, meta_)
            elif kind == "const":
                name, expr = payload
                for other, _, span in prog.constants:
                    if other == name:
                        raise CnncError(f"`{name}` is defined twice", meta_).with_note(span, "first defined here")
                prog.constants.append((name, expr, meta_))
            elif kind == "layers":
                once("layers", meta_)
                prog.layers, prog.layers_span = payload, meta_
            elif kind == "train":
                once("train", meta_)
                prog.train, prog.train_span = payload, meta_
        for b in prog.blocks.values():
            b.defaults = prog.defaults
        return prog

    @v_args(meta=True)
    def network_decl(self, meta, children):
        return ("network", self._span(meta), str(children[0]))

    @v_args(meta=True)
    def input_decl(self, meta, children):
        name, dims = children
        if dims.type == "NUMBER" and not str(dims).isdigit():
            raise CnncError("the input size must be whole numbers, like 3x224x224 or 784", self._tok(dims))
        return ("input", self._span(meta), (str(name) if name is not None else None, self.dims([dims])))

    @v_args(meta=True)
    def const_decl(self, meta, children):
        name, expr = children
        return ("const", self._tok(name), (str(name), expr))

    @v_args(meta=True)
    def classes_decl(self, meta, children):
        return ("classes", self._span(meta), children[0])

    @v_args(meta=True)
    def import_decl(self, meta, children):
        tok = children[0]
        return ast.Import(str(tok)[1:-1], self._tok(tok))

    @v_args(meta=True)
    def layers_sec(self, meta, children):
        header = Span(self.source, meta.line, meta.column, meta.line, meta.column + 6)
        return ("layers", header, children[0])

    @v_args(meta=True)
    def train_sec(self, meta, children):
        header = Span(self.source, meta.line, meta.column, meta.line, meta.column + 5)
        return ("train", header, list(children))


def too_large(name: str, where: Span | None = None) -> CnncError:
    """The error for a source over MAX_SOURCE_BYTES (read from a file or given as text)."""
    return CnncError(f"{name} is larger than {MAX_SOURCE_BYTES // 1024} KiB, the limit for one .cnn file", where,
                     "a network description is a few KiB; split it with `import`")


def _number(text: str, span: Span) -> int | float:
    """A number literal's value, refused before conversion when it is out of bounds."""
    digits = sum(ch.isdigit() for ch in text.split("e")[0].split("E")[0])
    if digits > MAX_NUMBER_DIGITS:
        raise CnncError(f"number with {digits} digits; numbers have at most {MAX_NUMBER_DIGITS} digits", span)
    if text.isdigit():
        value = int(text)
        if value > MAX_INT:
            raise CnncError(f"number {text} is too large: integers go up to {MAX_INT:.0e}".replace("e+", "e"), span)
        return value
    value = float(text)
    if math.isinf(value):
        raise CnncError(f"number {text} is too large for a float", span)
    return value


# Rules whose nesting is nesting the user wrote: each level costs stack in the tree walks.
_NESTING_RULES = frozenset({"for_stmt", "group", "add", "sub", "mul", "div", "floordiv", "mod", "neg", "tuple",
                            "func", "if_stmt", "elif_part", "compare", "or_", "and_", "not_"})


def _check_nesting(tree, source: Source) -> None:
    """Refuse a tree nested deeper than MAX_NESTING, found with an explicit stack."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in _NESTING_RULES:
            depth += 1
            if depth > MAX_NESTING:
                m = node.meta
                raise CnncError(f"nested more than {MAX_NESTING} levels deep (loops, parenthesised chains and "
                                "operators inside one another)", Span(source, m.line, m.column, m.line, m.column + 1),
                                "split the expression or the loops; compute a value in a block parameter")
        stack.extend((c, depth) for c in node.children if isinstance(c, Tree))


def _syntax_error(exc: UnexpectedInput, source: Source) -> CnncError:
    line = getattr(exc, "line", None) or 1
    col = getattr(exc, "column", None) or 1
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        line = max(1, len(source.text.splitlines()))
        col = len(source.line_text(line)) + 1
    span = Span(source, line, col, line, col + 1)
    hint = None
    if isinstance(exc, UnexpectedCharacters):
        ch = source.text[exc.pos_in_stream] if exc.pos_in_stream < len(source.text) else "?"
        msg = f"unexpected character `{ch}`"
        if ch == "\t":
            msg = "unexpected tab"
    elif isinstance(exc, (UnexpectedToken, UnexpectedEOF)):
        tok = getattr(exc, "token", None)
        expected = sorted({_describe(t) for t in exc.expected if not t.startswith("__ANON") or t == "__ANON_0"})
        if tok is None or tok.type == "$END":
            what = "end of file"
        elif tok.type == "_NL":
            what = "end of line"
        elif tok.type == "_INDENT":
            what = "indentation"
        elif tok.type == "_DEDENT":
            what = "end of the indented section"
        else:
            what = f"`{tok}`"
            span = Span(source, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
        if tok is not None and tok.type == "_INDENT":
            span = _start_of_next_line(source, tok.line)
        elif tok is not None and tok.type in ("_NL", "_DEDENT", "$END"):
            span = _end_of_previous_line(source, tok, line)
        msg = f"unexpected {what}"
        if expected:
            shown = expected if len(expected) <= 8 else expected[:8] + ["…"]
            msg += "; expected " + ", ".join(shown)
        if tok is not None and tok.type == "STAR":
            hint = "repetition `* N` applies to a block call or a parenthesised chain: `(conv 64 3x3 -> relu) * 2`"
        elif tok is not None and tok.type == "_INDENT":
            hint = "indent only the lines inside `block ...:`, `layers:`, `train:` and `for ...:`"
    else:  # pragma: no cover - lark has no other UnexpectedInput subclasses
        msg = str(exc)
    return CnncError(f"syntax error: {msg}", span, hint)


def _start_of_next_line(source: Source, line: int) -> Span:
    """An unexpected indent belongs to the next line with text: point at its first character."""
    lines = source.text.splitlines()
    for ln in range(line + 1, len(lines) + 1):
        text = lines[ln - 1]
        if text.strip() and not text.strip().startswith("#"):
            col = len(text) - len(text.lstrip()) + 1
            return Span(source, ln, col, ln, len(text) + 1)
    return Span(source, line, 1, line, 2)


def _end_of_previous_line(source: Source, tok: Token, line: int) -> Span:
    """Newline-ish tokens start at the end of the line they close: point there."""
    ln = getattr(tok, "line", None) or line
    text = source.line_text(ln)
    col = len(text.rstrip()) + 1 if text.strip() else 1
    return Span(source, ln, col, ln, col + 1)


def parse(text: str, name: str = "<string>") -> ast.Program:
    """Parse one file's text. Imports are not followed here: see `dsl.loader.load`."""
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    source = Source(name, text)
    if len(text) > MAX_SOURCE_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise too_large(name)
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, source) from None
    except DedentError as exc:
        line = _dedent_line(text, str(exc))
        span = Span(source, line, 1, line, 2)
        raise CnncError("syntax error: this line's indentation matches no enclosing line", span,
                        "indent with the same number of spaces as the lines around it") from None
    _check_nesting(tree, source)
    try:
        return _ToAst(source).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, CnncError):
            raise exc.orig_exc from None
        raise InternalError(f"building the syntax tree of {name} failed in rule `{exc.rule}`") from exc.orig_exc


def _dedent_line(text: str, message: str) -> int:
    """Lark's DedentError does not say where; find the first line whose indent is not on the stack."""
    stack = [0]
    for i, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(raw.expandtabs(4)) - len(raw.expandtabs(4).lstrip())
        if indent > stack[-1]:
            stack.append(indent)
        else:
            while indent < stack[-1]:
                stack.pop()
            if indent != stack[-1]:
                return i
    return 1
