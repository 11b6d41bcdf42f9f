"""The NumPy backend's element-wise ops, rendered from the op table's formulas.

Every op with a `Formula` (compiler/formula.py) runs through `forward(op)` and `derivative(op)`:
Python functions generated once per op from its expression trees, over arrays of any dtype
(float32 in training, float64 in the gradient tests). The same functions serve the plain
kernels, the element-wise chains and the fused conv/dense epilogues, so fused and unfused
values are the same to the bit.

Rendering notes: `max(v, c)` and `min(v, c)` with a constant c become `np.clip`, several times
faster than NumPy's scalar maximum; comparisons are boolean arrays, which multiply as 0/1;
sigmoid is ½(1 + tanh(x/2)) (no overflow for large |x|), softplus log(1 + eˣ) is
`logaddexp(0, x)`. erf comes from SciPy when it is installed, else from `math.erf` element by
element (exact, slower).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from cnnc.compiler.formula import Expr, render
from cnnc.compiler.ops import OPS

_CALLS = {
    "exp": "np.exp({0})", "expm1": "np.expm1({0})", "log": "np.log({0})", "log1p": "np.log1p({0})",
    "sqrt": "np.sqrt({0})", "tanh": "np.tanh({0})", "erf": "_erf({0})", "abs": "np.abs({0})",
    "sigmoid": "_sigmoid({0})", "softplus": "np.logaddexp(0.0, {0})", "min": "np.minimum({0}, {1})",
    "max": "np.maximum({0}, {1})", "clip": "np.clip({0}, {1}, {2})", "where": "np.where({0}, {1}, {2})",
}


def _sigmoid(v):
    t = np.tanh(v * 0.5)
    t += 1
    t *= 0.5
    return t


@lru_cache(maxsize=1)
def _erf_impl():
    try:
        from scipy.special import erf  # optional: vectorised
        return erf
    except ImportError:
        return np.vectorize(math.erf, otypes=[np.float64])


def _erf(v):
    v = np.asarray(v)
    return _erf_impl()(v).astype(v.dtype, copy=False)


def _text(e: Expr) -> str:
    def num(v: float) -> str:
        return "np.inf" if v == math.inf else repr(v)

    def call(fn: str, args: list[str]) -> str:
        if fn in ("max", "min") and any(_is_number(a) for a in args):  # v against a number: a clip
            v, c = (args[1], args[0]) if _is_number(args[0]) else (args[0], args[1])
            return f"np.clip({v}, {c}, None)" if fn == "max" else f"np.clip({v}, None, {c})"
        return _CALLS[fn].format(*args)

    def op(kind: str, name: str, args: list[str]) -> str:
        if kind == "neg":
            return f"(-{args[0]})"
        return f"({args[0]} {name} {args[1]})"

    return render(e, var=lambda n: n, num=num, call=call, op=op)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


_NAMESPACE = {"np": np, "_sigmoid": _sigmoid, "_erf": _erf}


def _compile(name: str, args: tuple[str, ...], body: str, where: str):
    src = f"def {name}({', '.join(args)}):\n    return {body}\n"
    code = compile(src, f"<formula of {where}>", "exec")
    ns = dict(_NAMESPACE)
    exec(code, ns)  # noqa: S102 — the op table's own formulas, parsed and checked by compiler/formula.py
    return ns[name]


@lru_cache(maxsize=None)
def forward(op: str):
    """f(x, *args) → y, for an op with a formula."""
    f = OPS[op].formula
    return _compile("forward", ("x",) + f.params, _text(f.fwd), op)


@lru_cache(maxsize=None)
def derivative(op: str):
    """f'(x, y, *args) → dy/dx (a number, an array, or a boolean mask that multiplies as 0/1)."""
    f = OPS[op].formula
    return _compile("derivative", ("x", "y") + f.params, _text(f.grad), op)


def apply(op: str, args: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """y = f(x) as a new array of x's dtype."""
    with np.errstate(over="ignore", under="ignore"):  # where() evaluates both branches; one may overflow
        y = forward(op)(x, *args)
    return np.asarray(y, dtype=x.dtype) if not (isinstance(y, np.ndarray) and y.dtype == x.dtype) else y


def grad(op: str, args: tuple[float, ...], x, y, dy: np.ndarray) -> np.ndarray:
    """dy · f'(x, y) as a new array of dy's dtype. x or y may be None where the derivative does not read it."""
    with np.errstate(over="ignore", under="ignore"):
        d = derivative(op)(x, y, *args)
    out = dy * d
    return out if out.dtype == dy.dtype else out.astype(dy.dtype)


# ---- the kernel every op with a formula runs ---------------------------------------------------

def _node_args(node) -> tuple[float, ...]:
    return tuple(float(node.attrs.get(p)) for p in OPS[node.op].formula.params)


def eltwise_forward(node, xs, params, ctx):
    (x,) = xs
    reads = OPS[node.op].formula.grad_reads
    y = apply(node.op, _node_args(node), x)
    return y, (x if "input" in reads else None, y if "output" in reads else None)


def eltwise_backward(node, saved, dy, params, ctx):
    x, y = saved
    return [grad(node.op, _node_args(node), x, y, dy)], {}
