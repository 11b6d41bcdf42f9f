"""Element-wise formulas: an op's y = f(x) and its derivative dy/dx as data every backend renders.

A formula is an expression in Python syntax over `x` (the op's input), `y` (its output: in
derivatives only), the op's numeric attributes (leaky_relu's `slope`), numbers and `inf`, with
+ − * /, comparisons (1 where true, 0 elsewhere) and these functions:

    exp expm1 log log1p sqrt tanh erf abs sigmoid softplus  (one argument)
    min max                                           (two)
    clip(v, lo, hi)  where(cond, a, b)

It is parsed once, when the op table is built, into a small tree (`Expr`); a mistake in the
table is an internal error naming the op. The NumPy backend renders trees into Python functions
over arrays, the CUDA backend into device functions of one generated header; both keep the
tree's order of operations, so every backend computes the same expression.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from cnnc.dsl.errors import InternalError

FUNCTIONS = {"exp": 1, "expm1": 1, "log": 1, "log1p": 1, "sqrt": 1, "tanh": 1, "erf": 1, "abs": 1, "sigmoid": 1,
             "softplus": 1, "min": 2, "max": 2, "clip": 3, "where": 3}
BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
COMPARE = {ast.Gt: ">", ast.Lt: "<", ast.GtE: ">=", ast.LtE: "<="}
VARIABLES = ("x", "y")


@dataclass(frozen=True)
class Expr:
    """A node of a formula: kind "num" (value), "var" (name), "neg" (args[0]), "bin" / "cmp"
    (name is the operator, args the operands) or "call" (name is the function)."""

    kind: str
    name: str = ""
    value: float = 0.0
    args: tuple["Expr", ...] = ()

    def names(self) -> set[str]:
        """Every variable and parameter the expression reads."""
        if self.kind == "var":
            return {self.name}
        out: set[str] = set()
        for a in self.args:
            out |= a.names()
        return out

    def functions(self) -> set[str]:
        """Every function the expression calls."""
        out: set[str] = {self.name} if self.kind == "call" else set()
        for a in self.args:
            out |= a.functions()
        return out


def parse(text: str, params: tuple[str, ...], allowed: tuple[str, ...], where: str) -> Expr:
    """The tree of `text`, which may read the variables `allowed` and the parameters `params`."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise InternalError(f"{where}: formula `{text}` does not parse: {e.msg}") from None
    known = set(params) | set(allowed) | {"inf"}

    def walk(n) -> Expr:
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            return Expr("num", value=float(n.value))
        if isinstance(n, ast.Name):
            if n.id not in known:
                raise InternalError(f"{where}: formula `{text}` reads `{n.id}`; it may read "
                                    + ", ".join(sorted(known)))
            if n.id == "inf":
                return Expr("num", value=float("inf"))
            return Expr("var", name=n.id)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return Expr("neg", args=(walk(n.operand),))
        if isinstance(n, ast.BinOp) and type(n.op) in BINARY:
            return Expr("bin", BINARY[type(n.op)], args=(walk(n.left), walk(n.right)))
        if isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in COMPARE:
            return Expr("cmp", COMPARE[type(n.ops[0])], args=(walk(n.left), walk(n.comparators[0])))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in FUNCTIONS and not n.keywords:
            if len(n.args) != FUNCTIONS[n.func.id]:
                raise InternalError(f"{where}: `{n.func.id}` takes {FUNCTIONS[n.func.id]} arguments in `{text}`")
            return Expr("call", n.func.id, args=tuple(walk(a) for a in n.args))
        raise InternalError(f"{where}: formula `{text}` uses `{ast.unparse(n)}`, which formulas do not have")

    return walk(tree)


@dataclass(frozen=True)
class Formula:
    """y = forward(x) and dy/dx = derivative(x, y), with the numeric attributes `params` they read.

    What the derivative reads decides what backward keeps: `y` alone (relu, sigmoid, tanh: the
    output tells the slope), or `x` (hardswish, gelu, mish: the output does not)."""

    forward: str
    derivative: str
    params: tuple[str, ...] = ()
    fwd: Expr = field(init=False, repr=False, compare=False)
    grad: Expr = field(init=False, repr=False, compare=False)

    def bind(self, op: str) -> "Formula":
        object.__setattr__(self, "fwd", parse(self.forward, self.params, ("x",), f"op `{op}`"))
        object.__setattr__(self, "grad", parse(self.derivative, self.params, VARIABLES, f"op `{op}` derivative"))
        return self

    @property
    def grad_reads(self) -> frozenset[str]:
        """"input" and/or "output": what the derivative needs kept from forward."""
        names = self.grad.names()
        return frozenset(({"input"} if "x" in names else set()) | ({"output"} if "y" in names else set()))


def render(e: Expr, var, num, call, op) -> str:
    """Text of `e` through four renderers: var(name), num(value), call(fn, [args]), op(kind, name, [args])
    for "neg", "bin" and "cmp"."""
    if e.kind == "num":
        return num(e.value)
    if e.kind == "var":
        return var(e.name)
    args = [render(a, var, num, call, op) for a in e.args]
    if e.kind == "call":
        return call(e.name, args)
    return op(e.kind, e.name, args)
