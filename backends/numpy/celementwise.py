"""Element-wise loops in C, generated from the op table's formulas: activations forward and backward
and the fused conv/dense epilogue (bias, residual, activation in one pass), on the C worker threads.

NumPy evaluates a formula one operation per pass over memory: tanh's gradient dy·(1 − y²) is three
passes and a temporary (0.23 ms at LeNet-5's 64×6×28×28, on the Python threads' blocks), silu
x·σ(x) five. Here a formula is one generated function that walks its input in blocks of BLOCK
elements (L1-sized): a call to a function NumPy computes with its own SIMD code (exp, tanh, log,
expm1, log1p, sqrt; sigmoid as NumPy's 1/(1 + e^−x); softplus as logaddexp(0, x); erf from SciPy's
ufunc where SciPy is there) fills a block-sized temporary with its argument and runs NumPy's own
inner loop of that ufunc over it, found in the ufunc object (its C struct, checked against what
the ufunc says of itself); the arithmetic around it is C that GCC vectorises, computing the tree
in its order, operation by operation, in the dtype (built with -ffp-contract=off, so no multiply-add
is fused). So every value has the bits of the NumPy rendering in elementwise.py (but for
FAST_EXP, below, in inference), which the fused-equals-unfused guarantees rest on; except where
NumPy promotes a derivative to float64 (a mask over a Python number: hardsigmoid's /6,
leaky_relu's slope): the loops stay in the dtype, as fused_bn's Numba loops do, within an ulp of
NumPy. min/max/clip keep a NaN and, on a tie, give the
second operand, as NumPy's do.

FAST_EXP: an inference epilogue (fused.epilogue's `fast`, a fused conv's forward outside
training) in float32 takes exp and sigmoid (sigmoid and silu) by its own inline polynomial,
fast_exp, which GCC vectorises, instead of NumPy's exp loop over a block: within 2 ulps of the
float64 sigmoid over its range, within 4 of NumPy's silu and sigmoid, the same infinities and
NaNs. On an AMD EPYC (AVX-512, 2 threads), silu with a bias over 96×112×112 took 1.18 → 0.78 ms
(NumPy's exp loop alone is 0.51-0.54 ns an element on one thread, fast_exp 0.24), and
EfficientNet-B0's inference at batch 1 0.90× the time (10 alternating rounds in one process).
Training keeps NumPy's bits, so that the fused training plan's gradients are the plain plan's.

One library per formula and dtype, built at first use (cc.py) and cached; where no C compiler works
(or with CNNC_JIT=0), or a ufunc's loop is not found, the callers' NumPy paths run.
"""

from __future__ import annotations

import ctypes
import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from cnnc.compiler.formula import Expr
from cnnc.compiler.ops import OPS

from . import cc, cthreads, parallel

# AVX-512's whole vectors where the CPU has them (GCC prefers 256-bit ones for -march=native): relu6
# with a bias over 96x112x112 float32 in place, one thread, 292 -> 222 us
WIDE_FLAGS = ("-mprefer-vector-width=512",)
BLOCK = 512  # elements a generated function takes at a time: its temporaries stay in L1
# arrays below this many elements stay on NumPy in `forward`: a C call costs ~8 us of Python around
# it, NumPy's tanh over 64x84 floats takes 2. The epilogue (several NumPy passes in one) and the
# gradients take C at any size: where NumPy promotes a derivative to float64 (leaky_relu's slope)
# the loops' bits are fused_bn's, not NumPy's, and the two paths must not mix
MIN_ELEMENTS = 16384

# ---- NumPy's inner loops -----------------------------------------------------------------------

# formula function → (ufunc, how the C uses it): "unary" f(t) in place; "sigmoid" NumPy's
# 1/(1 + exp(−t)) (elementwise._sigmoid); "logaddexp0" logaddexp(0, t)
_UFUNC_CALLS = {"exp": ("exp", "unary"), "expm1": ("expm1", "unary"), "log": ("log", "unary"),
                "log1p": ("log1p", "unary"), "sqrt": ("sqrt", "unary"), "tanh": ("tanh", "unary"),
                "sigmoid": ("exp", "sigmoid"), "softplus": ("logaddexp", "logaddexp0"), "erf": ("erf", "unary")}
_TYPENUM = {"float32": 11, "float64": 12}  # NPY_FLOAT, NPY_DOUBLE
# exp and sigmoid in a fast forward (float32 inference epilogues): fast_exp inline, no NumPy loop
_FAST_CALLS = {"exp": "fast_exp({0})", "sigmoid": "((T)1.0 / (fast_exp(-({0})) + (T)1))"}


_HEAD_OFFSET = object.__basicsize__  # PyObject_HEAD's size: where the ufunc's own fields start


class _UFuncHead(ctypes.Structure):
    """The start of NumPy's PyUFuncObject (numpy/ufuncobject.h), after PyObject_HEAD."""
    _fields_ = [("nin", ctypes.c_int), ("nout", ctypes.c_int), ("nargs", ctypes.c_int), ("identity", ctypes.c_int),
                ("functions", ctypes.c_void_p), ("data", ctypes.c_void_p), ("ntypes", ctypes.c_int),
                ("reserved1", ctypes.c_int), ("name", ctypes.c_char_p), ("types", ctypes.c_void_p)]


def _ufunc(name: str):
    if name == "erf":  # NumPy has none: elementwise.py's comes from SciPy where it is installed
        try:
            from scipy.special import erf
        except ImportError:
            return None
        return erf
    return getattr(np, name)


@lru_cache(maxsize=None)
def numpy_loop(name: str, dtype: str) -> tuple[int, int] | None:
    """(function, data) pointers of ufunc `name`'s inner loop for dtype's arrays, the loop NumPy
    runs for them, or None where it cannot be read: the struct is checked against the ufunc's own
    nin, nout, name and type signatures first."""
    uf = _ufunc(name)
    if not isinstance(uf, np.ufunc):
        return None
    head = _UFuncHead.from_address(id(uf) + _HEAD_OFFSET)
    if (head.nin, head.nout, head.nargs, head.ntypes) != (uf.nin, uf.nout, uf.nin + uf.nout, uf.ntypes) \
            or head.name != uf.__name__.encode() or not head.functions or not head.types:
        return None
    types = ctypes.string_at(head.types, head.ntypes * head.nargs)
    for i, sig in enumerate(uf.types):  # e.g. "ff->f"; the struct's typenums must say the same
        row = types[i * head.nargs:(i + 1) * head.nargs]
        if [np.dtype(c).num for c in sig.replace("->", "")] != list(row):
            return None
    want = _TYPENUM[dtype]
    for i in range(head.ntypes):
        if all(t == want for t in types[i * head.nargs:(i + 1) * head.nargs]):
            function = (ctypes.c_void_p * head.ntypes).from_address(head.functions)[i]
            data = (ctypes.c_void_p * head.ntypes).from_address(head.data)[i] if head.data else None
            return (function, data or 0) if function else None
    return None


# ---- rendering ---------------------------------------------------------------------------------

_OPS = {"neg": "(-{0})", "bin": "({0} {name} {1})", "cmp": "((T)({0} {name} {1}))"}  # a mask is 1 or 0
_FUNCTIONS = {"abs": "ABS({0})", "where": "({0} != 0 ? {1} : {2})"}  # min, max, clip: _bounds


def _bound(name: str, a: str, b: str, a_num: bool, b_num: bool) -> str:
    """min/max of a and b with NumPy's NaN and ties (_min, _max); against a number (never NaN) one
    comparison gives the same: relu6's clip took 14 vector instructions an element with two, 4 here."""
    if b_num:
        return f"({a} {'<=' if name == 'max' else '>='} {b} ? {b} : {a})"
    if a_num:
        return f"({a} {'>' if name == 'max' else '<'} {b} ? {a} : {b})"
    return f"_{name}({a}, {b})"


def _bounds(name: str, args: list[str], nums: list[bool]) -> str:
    if name == "clip":  # min(max(v, lo), hi)
        return _bound("min", _bound("max", args[0], args[1], nums[0], nums[1]), args[2], False, nums[2])
    return _bound(name, args[0], args[1], nums[0], nums[1])


def _ufunc_names(e: Expr, fast: bool = False) -> set[str]:
    """The NumPy ufuncs a formula's rendering calls (`fast`: but for those FAST_EXP renders)."""
    return {_UFUNC_CALLS[f][0] for f in e.functions() if f in _UFUNC_CALLS and not (fast and f in _FAST_CALLS)}


def renderable(e: Expr | None, dtype: str = "float32", fast: bool = False) -> bool:
    """Whether a formula is rendered in C for dtype: every NumPy function it calls has a loop found."""
    return e is not None and all(numpy_loop(u, dtype) is not None for u in _ufunc_names(e, fast))


class _Program:
    """A formula as C over a block of n elements: `lines` fill the temporaries (one per call to a
    NumPy loop, distinct subexpressions once), `expr(e)` is e's value at element i. Variables read
    `xb[i]` and `yb[i]`; the loops are the `L` table's entries, in `self.loops` order."""

    def __init__(self, x: str = "xb[i]", y: str = "yb[i]", fast: bool = False):
        self.vars = {"x": x, "y": y}
        self.lines: list[str] = []
        self.temps: dict[Expr, str] = {}
        self.loops: list[str] = []
        self.fast = fast  # exp and sigmoid by FAST_EXP inline, not NumPy's loop (see FAST_EXP)

    def _loop(self, ufunc: str) -> int:
        if ufunc not in self.loops:
            self.loops.append(ufunc)
        return self.loops.index(ufunc)

    def expr(self, e: Expr, into: str | None = None) -> str | None:
        """e's value at element i; with `into` (a pointer to the block's output), a root that is a
        plain NumPy loop writes there itself and None is returned."""
        def call(name, args, node):
            if name in ("min", "max", "clip"):
                return _bounds(name, args, [a.kind == "num" for a in node.args])
            if name not in _UFUNC_CALLS:
                return _FUNCTIONS[name].format(*args)
            if self.fast and name in _FAST_CALLS:
                return _FAST_CALLS[name].format(*args)
            ufunc, how = _UFUNC_CALLS[name]
            if node not in self.temps:
                t = into if node is e and how == "unary" and into else f"t{len(self.temps)}"
                self.temps[node] = t
                j = self._loop(ufunc)
                arg = node.args[0]
                if how == "unary" and arg.kind == "var":  # the loop reads the input block itself
                    src = {"x": "xb", "y": "yb"}[arg.name]
                else:
                    src = t
                    self.lines.append(f"for (long i = 0; i < n; i++) {t}[i] = "
                                      f"{'-' + args[0] if how == 'sigmoid' else args[0]};")
                self.lines.append(f"ucall2(L, {j}, &zero, {src}, {t}, n);" if how == "logaddexp0"
                                  else f"ucall1(L, {j}, {src}, {t}, n);")
            t = self.temps[node]
            if t == into:
                return None
            return f"((T)1.0 / ({t}[i] + (T)1))" if how == "sigmoid" else f"{t}[i]"

        def walk(n: Expr) -> str:
            if n.kind == "num":
                return "((T)INFINITY)" if n.value == math.inf else f"((T){n.value!r})"
            if n.kind == "var":
                return self.vars.get(n.name, f"p_{n.name}")
            args = [walk(a) for a in n.args]
            return call(n.name, args, n) if n.kind == "call" else _OPS[n.kind].format(*args, name=n.name)
        return walk(e)

    def declarations(self) -> str:
        return "".join(f"    T {t}[BLOCK];\n" for t in self.temps.values() if t.startswith("t"))


_HEADER = r"""
/* generated by cnnc.backends.numpy.celementwise from the op table's formula; safe to delete */
#include <math.h>
typedef void (*uloop_t)(char **args, const long *dims, const long *steps, void *data);
static inline T _max(T a, T b) { return (a != a || a > b) ? a : b; }
static inline T _min(T a, T b) { return (a != a || a < b) ? a : b; }
#if FAST
/* e^x in float32 (FAST_EXP): 2^k · e^r with k = rint(x / ln 2), r = x − k·ln 2 (ln 2 in two parts),
   e^r by its Taylor polynomial to r^7 (|r| ≤ 0.35: 5e-9 relative), 2^k as two powers of two built
   from exponent bits (each in range: the product overflows to inf, underflows through subnormals
   to 0, as e^x does); NaN stays NaN. GCC vectorises it: no branches, no calls */
static inline float fast_exp(float x) {
    const float xc = x < -150.0f ? -150.0f : (x > 100.0f ? 100.0f : x);
    const float k = __builtin_rintf(xc * 1.44269504088896341f);
    const float r = (xc - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int ki = (int)k, k1 = ki / 2, k2 = ki - k1;
    const int b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
    float s1, s2;
    __builtin_memcpy(&s1, &b1, 4);
    __builtin_memcpy(&s2, &b2, 4);
    const float e = p * s1 * s2;
    return x != x ? x : e;
}
#endif
/* NumPy's inner loop j of L (function, data pairs) over n elements: dst = f(src) */
static inline void ucall1(const long *L, int j, const T *src, T *dst, long n) {
    char *args[2] = {(char *)src, (char *)dst};
    long dims[1] = {n}, steps[2] = {sizeof(T), sizeof(T)};
    ((uloop_t)L[2 * j])(args, dims, steps, (void *)L[2 * j + 1]);
}
/* the binary loop j with a scalar first operand (stride 0): dst = f(*s, src) */
static inline void ucall2(const long *L, int j, const T *s, const T *src, T *dst, long n) {
    char *args[3] = {(char *)s, (char *)src, (char *)dst};
    long dims[1] = {n}, steps[3] = {0, sizeof(T), sizeof(T)};
    ((uloop_t)L[2 * j])(args, dims, steps, (void *)L[2 * j + 1]);
}
"""


def _params(op: str | None) -> str:
    names = () if op is None else OPS[op].formula.params
    return "".join(f"    const T p_{p} = P[{i}];\n" for i, p in enumerate(names))


def _block_loop(body: str, prog: _Program, whole: str = "1") -> str:
    """The loop over blocks of [lo, hi), `body` then the program's lines in each. Without
    temporaries (and where the C condition `whole` holds) the block is the whole range: blocks of
    512 cost NumPy's tanh loop 15% (LeNet-5's 64x6x28x28: 106 against 92 us)."""
    block = f"(({whole}) ? hi - lo : BLOCK)" if not any(t.startswith("t") for t in prog.temps.values()) else "BLOCK"
    return (f"    const long block = {block} > 0 ? {block} : 1;\n"
            f"    for (long base = lo; base < hi; base += block) {{\n"
            f"        const long n = hi - base < block ? hi - base : block;\n{body}"
            + "".join(f"        {line}\n" for line in prog.lines))


def _gradient_source(op: str) -> tuple[str, list[str]]:
    prog = _Program()
    d = prog.expr(OPS[op].formula.grad)
    body = ("        const T *xb = x + base, *yb = y + base, *gb = g + base;\n"
            "        T *ob = out + base;\n        (void)xb; (void)yb;\n")
    return _HEADER + f"""
/* out[i] = g[i] * f'(x[i], y[i]) over [lo, hi); x and y may be g where f' does not read them */
void grad(const T *x, const T *y, const T *g, T *restrict out, const T *P, const long *L, long lo, long hi) {{
    const T zero = 0; (void)zero; (void)L;
{_params(op)}{prog.declarations()}{_block_loop(body, prog)}        for (long i = 0; i < n; i++) ob[i] = gb[i] * {d};
    }}
}}
""", prog.loops


def _forward_source(op: str | None, fast: bool = False) -> tuple[str, list[str]]:
    """Elements [lo, hi) of y (rows of `inner`): z = y + bias[row % k] (has_b) + res (has_r), kept in
    y when keep, and out = f(z) (f the identity for op None); out may be y when not keep. `fast`:
    exp and sigmoid by fast_exp (FAST_EXP)."""
    prog = _Program(fast=fast)
    f = "xb[i]" if op is None else prog.expr(OPS[op].formula.fwd, into="ob")
    # a formula without NumPy's loops runs in the bias's pass itself, element by element
    direct = not prog.temps
    fv = "v" if op is None or not direct else _Program(x="v", fast=fast).expr(OPS[op].formula.fwd)
    body = ("        T z[BLOCK];\n"
            "        const T *xb = z, *yb = z; (void)yb;\n"
            "        T *ob = out + base; (void)ob;\n"
            "        if (has_b || has_r || keep) runs(y, bias, res, z, base, P, k, inner, base, base + n, has_b, has_r, keep);\n"
            "        else xb = y + base;  /* z is y itself: read in place */\n")
    return _HEADER + f"""
/* out[i − out0] = F(y + bias + res) over [lo, hi), run by run of one row (one bias value), v kept in
   y when keep. F is the formula where it has no NumPy loops (DIRECT: the whole epilogue in this one
   pass, out the output, which may be y: each element is read before it is written), else the
   identity (out the block's z, out0 its start) */
#define DIRECT {int(direct)}
static inline __attribute__((always_inline)) void runs(
        T *y, const T *restrict bias, const T *restrict res, T *out, long out0, const T *P, long k,
        long inner, long lo, long hi, const int has_b, const int has_r, const int keep) {{
{_params(op) if direct else ""}    const long row = lo / inner;
    long col = lo - row * inner, ch = row % k;  /* counted on: a division a run cost 10 ns */
    if (inner == 1 && has_b) {{  /* 1x1 maps (LeNet-5's C5): a bias value an element */
        for (long i = lo; i < hi; i++) {{
            T v = y[i] + bias[ch];
            if (has_r) v = v + res[i];
            if (keep) y[i] = v;
            out[i - out0] = {fv};
            if (++ch == k) ch = 0;
        }}
        return;
    }}
    const int in_place = !keep && out == y;
    for (long pos = lo; pos < hi;) {{
        const long run = inner - col < hi - pos ? inner - col : hi - pos;
        const T bv = has_b ? bias[ch] : 0;
        T *restrict yr = y + pos;
        const T *restrict rr = res + pos;
        (void)bv; (void)rr;
        if (in_place)  /* one pointer: with two that overlap, GCC's run-time alias check took the
                          scalar loop (relu6 + bias over 96x112x112: 325 us, 205 with Numba's) */
            for (long i = 0; i < run; i++) {{
                T v = yr[i];
                if (has_b) v = v + bv;
                if (has_r) v = v + rr[i];
                yr[i] = {fv};
            }}
        else {{
            T *restrict outr = out + (pos - out0);
            for (long i = 0; i < run; i++) {{
                T v = yr[i];
                if (has_b) v = v + bv;
                if (has_r) v = v + rr[i];
                if (keep) yr[i] = v;
                outr[i] = {fv};
            }}
        }}
        pos += run;
        col = 0;
        if (++ch == k) ch = 0;
    }}
}}

#define VARIANT(NAME, HAS_B, HAS_R, KEEP) \\
static void NAME(T *y, const T *bias, const T *res, T *out, const T *P, const long *L, long k, \\
                 long inner, long lo, long hi) {{ \\
    const int has_b = HAS_B, has_r = HAS_R, keep = KEEP; \\
    BODY \\
}}
#define BODY forward_body(y, bias, res, out, P, L, k, inner, lo, hi, has_b, has_r, keep);

static inline __attribute__((always_inline)) void forward_body(
        T *y, const T *bias, const T *res, T *out, const T *P, const long *L, long k, long inner,
        long lo, long hi, const int has_b, const int has_r, const int keep) {{
    if (DIRECT) {{
        runs(y, bias, res, out, 0, P, k, inner, lo, hi, has_b, has_r, keep);
        return;
    }}
    const T zero = 0; (void)zero; (void)L;
{_params(op)}{prog.declarations()}{_block_loop(body, prog, "!has_b && !has_r && !keep")}{'' if f is None else f"        for (long i = 0; i < n; i++) ob[i] = {f};{chr(10)}"}    }}
}}
VARIANT(v000, 0, 0, 0) VARIANT(v100, 1, 0, 0) VARIANT(v010, 0, 1, 0) VARIANT(v110, 1, 1, 0)
VARIANT(v001, 0, 0, 1) VARIANT(v101, 1, 0, 1) VARIANT(v011, 0, 1, 1) VARIANT(v111, 1, 1, 1)

void forward(T *y, const T *bias, const T *res, T *out, const T *P, const long *L, long k, long inner,
             long mode, long lo, long hi) {{
    static void (*const variants[8])(T *, const T *, const T *, T *, const T *, const long *, long, long,
                                     long, long) = {{v000, v100, v010, v110, v001, v101, v011, v111}};
    variants[mode & 7](y, bias, res, out, P, L, k, inner, lo, hi);
}}
""", prog.loops


def _flags() -> tuple[str, ...]:
    return cc.EXACT_FLAGS + (WIDE_FLAGS if "avx512f" in parallel.cpu_flags() else ())


def _defines(dtype: str, fast: bool = False) -> dict:
    return dict(T="float" if dtype == "float32" else "double", BLOCK=BLOCK, FAST=int(fast),
                ABS="__builtin_fabsf" if dtype == "float32" else "__builtin_fabs")


_DTYPES = {"f": "float32", "d": "float64"}  # by dtype.char: dtype.name costs 1.6 us a call


class _Kernel(NamedTuple):
    task: object  # the cthreads task
    table: np.ndarray  # NumPy's loops, (function, data) pairs
    table_ptr: int
    zero: np.ndarray  # one element 0: the bias, the parameters where there are none
    zero_ptr: int


def _table(loops: list[str], dtype: str) -> np.ndarray:
    """The (function, data) pointer pairs of the program's NumPy loops, as the C reads them."""
    pairs = [numpy_loop(u, dtype) for u in loops]
    return np.array([v for p in pairs for v in p] or [0], dtype=np.int64)


def fast_applies(op: str | None, char: str) -> bool:
    """Whether a fast forward (FAST_EXP) differs from the exact one for op and dtype char: float32,
    and op's formula calls exp or sigmoid."""
    return char == "f" and op is not None and not OPS[op].formula.fwd.functions().isdisjoint(_FAST_CALLS)


@lru_cache(maxsize=None)
def _kernel(kind: str, op: str | None, char: str, fast: bool = False) -> _Kernel | None:
    """The compiled loop of kind "grad" (op's derivative) or "forward" (the epilogue with op's
    activation, None: none) for dtype char (`fast`: a forward with FAST_EXP, where fast_applies);
    None where a NumPy loop it calls is not found or the compiler fails (which turns the C kernels
    off, saying why)."""
    dtype = _DTYPES[char]
    f = None if op is None else OPS[op].formula
    fast = fast and kind == "forward" and fast_applies(op, char)
    if f is not None and not renderable(f.grad if kind == "grad" else f.fwd, dtype, fast):
        return None
    source, loops = _gradient_source(op) if kind == "grad" else _forward_source(op, fast)
    kinds = "ppppppLH" if kind == "grad" else "pppppplllLH"
    try:
        task = cthreads.load(_defines(dtype, fast), source, f"the {kind} loop of {op or 'the epilogue'}",
                             {kind: (kind, kinds)}, flags=_flags())[kind]
    except cc.BuildError as e:
        cc.give_up(e)
        return None
    table, zero = _table(loops, dtype), np.zeros(1, dtype)
    return _Kernel(task, table, table.ctypes.data, zero, zero.ctypes.data)


def has_gradient_loop(op: str, dtype: str = "float32") -> bool:
    """Whether op's gradient has a C loop (for dtype): a formula whose NumPy functions' loops are found."""
    f = OPS[op].formula
    return f is not None and renderable(f.grad, dtype)


def _ready(*arrays) -> str | None:
    """The dtype char of these arrays where the C loops take them: C-contiguous, one float dtype,
    and the C kernels on; else None."""
    char = arrays[0].dtype.char
    if char not in _DTYPES:
        return None
    for a in arrays:  # a loop, not all() over a generator: this runs at every epilogue
        if a.dtype.char != char or not a.flags.c_contiguous:
            return None
    return char if cc.available() else None


def _params_ptr(kernel: _Kernel, args, char: str) -> tuple[np.ndarray | None, int]:
    if not args:
        return None, kernel.zero_ptr
    return _param_array(tuple(args), char)


@lru_cache(maxsize=1024)
def _param_array(args: tuple, char: str) -> tuple[np.ndarray, int]:
    """An activation's parameters as the C reads them, made once per value (the loops only read it)."""
    p = np.array(args, dtype=char)
    p.flags.writeable = False
    return p, cthreads.address(p)


def gradient(op: str, args: tuple[float, ...], x, y, dy, out) -> bool:
    """out = dy · f'(x, y) in one C pass, for C-contiguous float arrays of one dtype and shape and an
    op with has_gradient_loop; False (nothing done) where that does not hold or no compiler works."""
    arrays = [a for a in (x, y) if a is not None] + [dy, out]
    char = _ready(*arrays)
    if char is None or any(a.shape != dy.shape for a in arrays):
        return False
    kernel = _kernel("grad", op, char)
    if kernel is None:
        return False
    p, p_ptr = _params_ptr(kernel, args, char)
    g = cthreads.address(dy)
    address = cthreads.address
    cthreads.run(kernel.task, [g if x is None else address(x), g if y is None else address(y), g, address(out), p_ptr,
                               kernel.table_ptr],
                 cthreads.chunks(dy.size, parallel.WORK_PER_ELEMENT * dy.size))
    return True


def _epilogue_call(y, bias, residual, act, out, whole_only: bool, fast: bool = False):
    """(task, its arguments, "all" or "affine", the arrays those point into) for the epilogue's C
    pass over y; None where it does not run (see epilogue), or with whole_only where the
    activation would be NumPy's."""
    if y.size == 0:
        return None
    char = _ready(y, out) if residual is None else _ready(y, out, residual)
    n, k = y.shape[:2]
    if char is None or (residual is not None and residual.shape != y.shape) \
            or (bias is not None and bias.shape != (k,)):
        return None
    kernel = _kernel("forward", None if act is None else act[0], char, fast)
    whole = kernel is not None
    if not whole:  # the activation is NumPy's: the bias and residual here, if any
        if whole_only:
            return None
        kernel = _kernel("forward", None, char) if (bias is not None or residual is not None) else None
        if kernel is None:
            return None
    b = bias if bias is None or (bias.dtype.char == char and bias.flags.c_contiguous) \
        else np.ascontiguousarray(bias, y.dtype)
    p, p_ptr = _params_ptr(kernel, act[1] if (act and whole) else (), char)
    keep = int(whole and out is not y)
    y_ptr = cthreads.address(y)
    mode = (bias is not None) + 2 * (residual is not None) + 4 * keep
    args = [y_ptr, kernel.zero_ptr if b is None else cthreads.address(b),
            y_ptr if residual is None else cthreads.address(residual),
            cthreads.address(out) if keep else y_ptr, p_ptr, kernel.table_ptr,
            # without a bias the rows do not matter: one row, one run a block
            k if bias is not None else 1, y.size // (n * k) if bias is not None else y.size, mode]
    return kernel.task, args, "all" if whole else "affine", (b, p, kernel)


def epilogue(y, bias, residual, act, out, fast: bool = False) -> str | None:
    """fused.epilogue's pass in C over y (N, K, …): z = y + bias + residual, then out = act(z) where
    the activation is rendered (out may be y; otherwise z stays in y). Returns "all" where the
    activation ran too, "affine" where only the bias and residual did (in place on y: the caller
    applies the activation), None where nothing ran (no compiler, other dtypes, a broadcast
    residual). `fast`: exp and sigmoid by FAST_EXP in float32 (inference)."""
    call = _epilogue_call(y, bias, residual, act, out, whole_only=False, fast=fast)
    if call is None:
        return None
    task, args, done, _ = call
    # unsplit where NumPy's activation follows on this thread: the other core's half of y, moved
    # to this one's cache, cost more than the split gained (LeNet-5's C1, bias and tanh: 0.18 ms
    # split, 0.13 unsplit)
    cthreads.run(task, args, cthreads.chunks(y.size, parallel.WORK_PER_ELEMENT * y.size) if done == "all"
                 else [(0, y.size)])
    return done


class Deferred(NamedTuple):
    """The epilogue's C pass as a task a kernel runs itself over ranges of y's elements (cgemm's
    shares, block by block right after each block's gemm): the task, its argument array, and the
    arrays that array points into (kept alive with it)."""
    task: object
    args: np.ndarray  # C longs
    keep: tuple


def deferred_epilogue(y, bias, residual, act, out, fast: bool = False) -> Deferred | None:
    """epilogue()'s whole pass (the activation rendered: "all"), not run but handed over; None
    where epilogue() would not run it whole."""
    call = _epilogue_call(y, bias, residual, act, out, whole_only=True, fast=fast)
    if call is None:
        return None
    task, args, _, keep = call
    return Deferred(task, np.array([v or 0 for v in args], dtype=cthreads.LONG), (y, out, residual, *keep))


def forward(op: str, args: tuple[float, ...], x, out) -> bool:
    """out = f(x) in one C pass (an element-wise op on its own), where op's formula is rendered for
    these C-contiguous arrays of one float dtype; False (nothing done) otherwise."""
    char = _ready(x, out)
    if char is None or x.size < MIN_ELEMENTS or x.shape != out.shape:
        return False
    kernel = _kernel("forward", op, char)
    if kernel is None:
        return False
    p, p_ptr = _params_ptr(kernel, args, char)
    x_ptr = cthreads.address(x)  # z = x (no bias, no residual, not kept): x is only read
    cthreads.run(kernel.task,
                 [x_ptr, kernel.zero_ptr, x_ptr, cthreads.address(out), p_ptr, kernel.table_ptr, 1, x.size, 0],
                 cthreads.chunks(x.size, parallel.WORK_PER_ELEMENT * x.size))
    return True


# ---- per-row sums and scales: the bias gradient, the global average pool, gates ---------------

_ROWS_SOURCE = r"""
/* generated by cnnc.backends.numpy.celementwise: per-row sums and scales; safe to delete */
/* sums[r] = the sum of row r of x (rows, inner), rows [lo, hi): VL lanes of partial sums, the lanes
   added pairwise, then the tail; the order depends on the row's length only, not on the threads */
#define VL 16
void row_sums(const T *restrict x, T *restrict sums, long inner, long lo, long hi) {
    for (long r = lo; r < hi; r++) {
        const T *row = x + r * inner;
        T acc[VL] = {0};
        long i = 0;
        for (; i + VL <= inner; i += VL)
            for (int j = 0; j < VL; j++) acc[j] += row[i + j];
        for (int w = VL / 2; w >= 1; w /= 2)
            for (int j = 0; j < w; j++) acc[j] += acc[j + w];
        T s = acc[0];
        for (; i < inner; i++) s += row[i];
        sums[r] = s;
    }
}

/* out[r, i] = x[r, i] * s[r] for rows [lo, hi) of x (rows, inner): one IEEE product an element */
void row_scales(const T *restrict x, const T *restrict s, T *restrict out, long inner, long lo, long hi) {
    for (long r = lo; r < hi; r++) {
        const T v = s[r];
        const T *xr = x + r * inner;
        T *o = out + r * inner;
        for (long i = 0; i < inner; i++) o[i] = xr[i] * v;
    }
}
"""


@lru_cache(maxsize=None)
def _row_tasks(char: str) -> dict | None:
    """The row sums' and row scales' tasks ("sums", "scales") for dtype char; None where the
    compiler fails (which turns the C kernels off, saying why)."""
    try:
        return cthreads.load(_defines(_DTYPES[char]), _ROWS_SOURCE, "the row sums and scales",
                             {"sums": ("row_sums", "pplLH"), "scales": ("row_scales", "ppplLH")}, flags=_flags())
    except cc.BuildError as e:
        cc.give_up(e)
        return None


def scale_maps(x: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """x (N, K, …) times s (N, K, 1, …), each map by its value (a squeeze-excitation gate), as a
    new array, in C on the threads: NumPy's x * s to the bit (one product an element); None where
    the C kernels are off, the arrays are not C-contiguous of one float dtype, or s is not one
    value a map."""
    n, k = x.shape[:2]
    if s.size != n * k or s.shape[:2] != (n, k) or x.size == 0:
        return None
    char = _ready(x, s)
    tasks = None if char is None else _row_tasks(char)
    if tasks is None:
        return None
    out = np.empty_like(x)
    cthreads.run(tasks["scales"], [cthreads.address(x), cthreads.address(s), cthreads.address(out), x.size // (n * k)],
                 cthreads.chunks(n * k, parallel.WORK_PER_ELEMENT * x.size))
    return out


def map_sums(x: np.ndarray) -> np.ndarray | None:
    """Σ over each (image, channel) map of x (N, K, …), as (N, K): in C, lanes of partial sums,
    split over the threads by rows; None where the C kernels are off or the maps are under a
    vector (the callers' NumPy sums then run; the two differ in rounding only)."""
    n, k = x.shape[:2]
    inner = x.size // max(n * k, 1)
    char = _ready(x) if inner >= 16 else None
    tasks = None if char is None else _row_tasks(char)
    if tasks is None:
        return None
    sums = np.empty((n, k), dtype=x.dtype)
    cthreads.run(tasks["sums"], [cthreads.address(x), cthreads.address(sums), inner],
                 cthreads.chunks(n * k, parallel.WORK_PER_ELEMENT * x.size))
    return sums


def channel_sums(dy: np.ndarray) -> np.ndarray:
    """Σ over the batch and the map of dy (N, K, …) per channel: a conv's bias gradient. Each image's
    channel map summed in C (map_sums), then the images by NumPy; NumPy's dy.sum(axis=(0, 2, 3))
    where map_sums does not run. 64 µs → 15 at LeNet-5's 64×6×28×28."""
    sums = map_sums(dy)
    if sums is None:
        return dy.sum(axis=tuple(i for i in range(dy.ndim) if i != 1))
    return sums.sum(axis=0)
