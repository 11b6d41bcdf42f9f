"""The NumPy backend's element-wise ops, rendered from the op table's formulas.

Every op with a `Formula` (compiler/formula.py) runs through `forward(op)` and `derivative(op)`:
Python functions generated once per op from its expression trees, over arrays of any dtype
(float32 in training, float64 in the gradient tests). The same functions serve the plain
kernels, the element-wise chains and the fused conv/dense epilogues, so fused and unfused
values are the same to the bit.

Rendering notes: `max(v, c)` and `min(v, c)` with a constant c become `np.clip`, several times
faster than NumPy's scalar maximum; comparisons are boolean arrays, which multiply as 0/1;
sigmoid is 1/(1 + e^−x) (NumPy's float32 exp is about twice as fast as its tanh; the overflow
of e^−x for very negative x gives the right 0), softplus log(1 + eˣ) is
`logaddexp(0, x)`. erf comes from SciPy when it is installed, else from `math.erf` element by
element (exact, slower).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from cnnc.compiler.formula import Expr
from cnnc.compiler.ops import OPS

from . import celementwise, parallel

_CALLS = {
    "exp": "np.exp({0})", "expm1": "np.expm1({0})", "log": "np.log({0})", "log1p": "np.log1p({0})",
    "sqrt": "np.sqrt({0})", "tanh": "np.tanh({0})", "erf": "_erf({0})", "abs": "np.abs({0})",
    "sigmoid": "_sigmoid({0})", "softplus": "np.logaddexp(0.0, {0})", "min": "np.minimum({0}, {1})",
    "max": "np.maximum({0}, {1})", "clip": "np.clip({0}, {1}, {2})", "where": "np.where({0}, {1}, {2})",
}


def _sigmoid(v, out=None):
    t = np.negative(v, out=out)
    with np.errstate(over="ignore"):  # e^−x overflows to inf for x < −88 (float32): 1/(1 + inf) is 0
        np.exp(t, out=t)
    t += 1
    np.divide(1.0, t, out=t)  # the same bits as np.reciprocal, which has no SIMD loop here (0.26 vs 0.17 ns)
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


def _num(v: float) -> str:
    return "np.inf" if v == math.inf else repr(v)


def _node_text(e: Expr, args: list[str]) -> str:
    """One node of a formula over its operands' texts."""
    if e.kind == "call":
        if e.name in ("max", "min") and any(_is_number(a) for a in args):  # v against a number: a clip
            v, c = (args[1], args[0]) if _is_number(args[0]) else (args[0], args[1])
            return f"np.clip({v}, {c}, None)" if e.name == "max" else f"np.clip({v}, None, {c})"
        return _CALLS[e.name].format(*args)
    if e.kind == "neg":
        return f"(-{args[0]})"
    return f"({args[0]} {e.name} {args[1]})"


_UFUNCS = {"+": "np.add", "-": "np.subtract", "*": "np.multiply", "/": "np.divide"}
# what writes a node's value into a given array: ufuncs (and clip, sigmoid) with out=
_INTO = {**_UFUNCS, ">": "np.greater", "<": "np.less", ">=": "np.greater_equal", "<=": "np.less_equal",
         "exp": "np.exp", "expm1": "np.expm1", "log": "np.log", "log1p": "np.log1p", "sqrt": "np.sqrt",
         "tanh": "np.tanh", "abs": "np.absolute", "sigmoid": "_sigmoid", "min": "np.minimum",
         "max": "np.maximum", "clip": "np.clip"}


def _into_text(e: Expr, args: list[str]) -> str:
    """A statement writing node e's value into `out`: the node's own ufunc with out=, else a copy."""
    if e.kind == "call" and e.name in ("max", "min") and any(_is_number(a) for a in args):
        v, c = (args[1], args[0]) if _is_number(args[0]) else (args[0], args[1])
        return f"np.clip({v}, {c}, None, out=out)" if e.name == "max" else f"np.clip({v}, None, {c}, out=out)"
    if e.kind == "call" and e.name == "softplus":
        return f"np.logaddexp(0.0, {args[0]}, out=out)"
    if e.kind in ("bin", "cmp", "call") and e.name in _INTO:
        return f"{_INTO[e.name]}({', '.join(args)}, out=out)"
    if e.kind == "neg":
        return f"np.negative({args[0]}, out=out)"
    return f"out[...] = {_node_text(e, args) if e.kind not in ('num', 'var') else args[0]}"


def _statements(e: Expr, into: bool = False) -> tuple[list[str], str]:
    """The formula as statements: each distinct subexpression computed once (silu's derivative reads
    sigmoid(x) twice: one tanh, not two), and arithmetic written into a temporary that is not read
    again instead of a new array. x, y and the parameters are never written. With `into`, the last
    statement writes the result into the array `out` (no copy of a temporary afterwards)."""
    uses: dict[Expr, int] = {}

    def count(n: Expr) -> None:
        uses[n] = uses.get(n, 0) + 1
        if uses[n] == 1:
            for a in n.args:
                count(a)

    count(e)
    lines: list[str] = []
    done: dict[Expr, str] = {}
    fresh: set[str] = set()  # temporaries holding float arrays of their own (never x, y, a scalar or a mask)
    left: dict[str, int] = {}  # reads of each temporary still to come

    def array(n: Expr) -> bool:
        return bool(n.names() & {"x", "y"})

    def emit(n: Expr) -> str:
        if n.kind == "num":
            return _num(n.value)
        if n.kind == "var":
            return n.name
        if n in done:
            return done[n]
        args = [emit(a) for a in n.args]
        for a in args:
            if a in left:
                left[a] -= 1
        if into and n is e:
            lines.append(_into_text(n, args))
            return "out"
        t = f"t{len(lines)}"
        reuse = None
        if n.kind == "bin" and array(n):
            a, b = args
            reuse = next((v for v in (a, b) if v in fresh and left[v] == 0), None)
            if reuse is not None:  # operands stay in order: np.subtract(1.0, t, out=t) is 1 − t
                lines.append(f"{_UFUNCS[n.name]}({a}, {b}, out={reuse})")
                t = reuse
        if reuse is None:
            lines.append(f"{t} = {_node_text(n, args)}")
            if array(n) and not _is_mask(n):
                fresh.add(t)
        done[n] = t
        left[t] = uses[n]
        return t

    result = emit(e)
    if into and result != "out":  # the formula is a variable or a number
        lines.append(f"out[...] = {result}")
        result = "out"
    return lines, result


def _is_mask(e: Expr) -> bool:
    """Whether NumPy computes `e` as a boolean array: a comparison, or a product or sum of them."""
    return e.kind == "cmp" or (e.kind == "bin" and e.name in "*+" and all(_is_mask(a) for a in e.args))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


_NAMESPACE = {"np": np, "_sigmoid": _sigmoid, "_erf": _erf}


def _compile(name: str, args: tuple[str, ...], e: Expr, where: str, into: bool = False):
    lines, result = _statements(e, into)
    src = f"def {name}({', '.join(args)}):\n" + "".join(f"    {line}\n" for line in lines) + f"    return {result}\n"
    code = compile(src, f"<formula of {where}>", "exec")
    ns = dict(_NAMESPACE)
    exec(code, ns)  # noqa: S102 — the op table's own formulas, parsed and checked by compiler/formula.py
    return ns[name]


@lru_cache(maxsize=None)
def forward(op: str):
    """f(x, *args) → y, for an op with a formula."""
    f = OPS[op].formula
    return _compile("forward", ("x",) + f.params, f.fwd, op)


@lru_cache(maxsize=None)
def derivative(op: str):
    """f'(x, y, *args) → dy/dx (a number, an array, or a boolean mask that multiplies as 0/1)."""
    f = OPS[op].formula
    return _compile("derivative", ("x", "y") + f.params, f.grad, op)


@lru_cache(maxsize=None)
def forward_into(op: str):
    """f(x, *args, out) → out, out = f(x): out may be x itself (the last statement writes it)."""
    f = OPS[op].formula
    return _compile("forward_into", ("x",) + f.params + ("out",), f.fwd, op, into=True)


def apply_into(op: str, args: tuple[float, ...], x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = f(x), written into out (which may be x), without a temporary for the result."""
    with np.errstate(over="ignore", under="ignore"):
        return forward_into(op)(x, *args, out)


def grad_into(op: str, args: tuple[float, ...], x, y, dy: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = dy · f'(x, y), the product written straight into out."""
    with np.errstate(over="ignore", under="ignore"):
        d = derivative(op)(x, y, *args)
    return np.multiply(dy, d, out=out)


def apply(op: str, args: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """y = f(x) as a new array of x's dtype."""
    with np.errstate(over="ignore", under="ignore"):  # where() evaluates both branches; one may overflow
        y = forward(op)(x, *args)
    return np.asarray(y, dtype=x.dtype) if not (isinstance(y, np.ndarray) and y.dtype == x.dtype) else y


def grad(op: str, args: tuple[float, ...], x, y, dy: np.ndarray) -> np.ndarray:
    """dy · f'(x, y) as a new array of dy's dtype. x or y may be None where the derivative does not read it."""
    with np.errstate(over="ignore", under="ignore"):
        d = derivative(op)(x, y, *args)
    if isinstance(d, np.ndarray) and d.dtype == dy.dtype and d.shape == dy.shape and d is not x and d is not y:
        d *= dy  # the derivative is a temporary of its own: the product goes into it
        return d
    out = dy * d
    return out if out.dtype == dy.dtype else out.astype(dy.dtype)


# ---- the kernel every op with a formula runs ---------------------------------------------------

def _node_args(node) -> tuple[float, ...]:
    return tuple(float(node.attrs.get(p)) for p in OPS[node.op].formula.params)


# Elements per block of a formula on its own: its several temporaries, the input(s) and the output
# together stay within a core's L2 (silu at 32x96x56x56 on 2 cores, forward / backward: whole arrays
# 41 / 60 ms, blocks of 2^18 19 / 45, of 2^16 20 / 31, of 2^14 48 / 63).
FORMULA_BLOCK = 1 << 16


def _blockwise(fn, out: np.ndarray, arrays: list) -> np.ndarray:
    """fn(*arrays, out) writing into out, evaluated block by block (parallel.ranges): a formula's
    temporaries stay in the cache instead of each making a pass over memory, and the blocks are
    shared by the threads. The values are those of one whole-array call: every element is computed
    on its own."""
    flat = [None if a is None else a.reshape(-1) for a in arrays]
    of = out.reshape(-1)

    def block(a, b):
        fn(*(None if f is None else f[a:b] for f in flat), of[a:b])

    parallel.ranges(out.size, block, block=FORMULA_BLOCK)
    return out


def _large(*arrays) -> bool:
    """Worth splitting into blocks: big and C-contiguous (flat views, no copies)."""
    live = [a for a in arrays if a is not None]
    return live[0].size >= 4 * FORMULA_BLOCK and all(a.flags.c_contiguous for a in live)


def eltwise_forward(node, xs, params, ctx):
    (x,) = xs
    reads = OPS[node.op].formula.grad_reads
    args = _node_args(node)
    y = None
    if x.size >= celementwise.MIN_ELEMENTS and x.flags.c_contiguous:  # one C pass, where it has one
        out = np.empty_like(x)
        y = out if celementwise.forward(node.op, args, x, out) else None
    if y is None:
        y = (_blockwise(lambda v, o: apply_into(node.op, args, v, o), np.empty_like(x), [x]) if _large(x)
             else apply(node.op, args, x))
    return y, (x if "input" in reads else None, y if "output" in reads else None)


def eltwise_backward(node, saved, dy, params, ctx):
    x, y = saved
    args = _node_args(node)
    out = np.empty_like(dy)
    if celementwise.gradient(node.op, args, x, y, dy, out):  # one C pass, where it has one
        return [out], {}
    if _large(x, y, dy):
        return [_blockwise(lambda a, b, g, o: grad_into(node.op, args, a, b, g, o), np.empty_like(dy), [x, y, dy])], {}
    return [grad(node.op, args, x, y, dy)], {}
