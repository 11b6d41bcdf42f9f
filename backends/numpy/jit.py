"""Whether the NumPy backend's compiled loops (`jit_loops.py`, Numba) run, and the loops themselves.

Numba is the optional extra `[jit]`; it is imported on the first kernel call that could use it,
never at import time. `CNNC_JIT=0` keeps every kernel on the plain NumPy path (the reference the
tests compare against); without Numba installed that path is the only one, silently, since the
results are the same. The loops are serial and release the GIL (`nogil`); `run` splits each one's
outer range over the backend's own worker threads (`parallel.py`), so NumPy's kernels and the
compiled ones share one pool. Numba's parallel loops had a pool of their own: its work-queue layer
cost 0.1–1 ms a launch (a batch-1 depthwise conv of 0.3 ms took 1.0–1.2 ms in a network), its
OpenMP layer's threads spin between calls and took the cores from the backend's threads.

Generated here from the op table's formulas, for the piecewise activations: fused_bn's loops
(BatchNorm's normalisation, the residual and the activation in one pass forward, the gradient with
BatchNorm's sums in one pass backward). The activations' own gradients and the fused conv
epilogue are C loops (celementwise.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

from cnnc.compiler.formula import Expr
from cnnc.compiler.ops import OPS

from . import parallel

_loops = None  # the jit_loops module once imported; False when Numba is missing


# os.environ's own mapping (encoded keys and values), read directly: allowed() runs before every
# compiled kernel (19 times in LeNet-5's training step), and os.environ.get's four Python calls cost
# ~0.1 ms a step there (2.68 against 2.59 ms with the check made a constant, alternating runs)
_ENVIRON = getattr(os.environ, "_data", None)
_JIT_KEY = os.environ.encodekey("CNNC_JIT") if _ENVIRON is not None else None
_ZERO = os.environ.encodevalue("0") if _ENVIRON is not None else None


def allowed() -> bool:
    """CNNC_JIT is not 0: the compiled paths (these loops, direct.py's C) may run."""
    if _ENVIRON is None:
        return os.environ.get("CNNC_JIT", "1").strip() != "0"
    value = _ENVIRON.get(_JIT_KEY)
    return value is None or value.strip() != _ZERO


def enabled() -> bool:
    """CNNC_JIT is not 0 and Numba can be imported."""
    return allowed() and _module() is not None


def _module():
    global _loops
    if _loops is None:
        try:
            import numba  # noqa: F401  (first: `from . import` finds jit_loops on the package once imported)
            from . import jit_loops
        except ImportError:
            _loops = False
        else:
            _loops = jit_loops
    return _loops or None


def loops():
    """The compiled loops' module; call only where enabled() said yes."""
    return _module()


def run(kernel, n: int, work: float, *args) -> None:
    """kernel(*args, lo, hi) over [0, n) of its outer loop, split into one chunk per worker thread
    when the work (parallel.chunks' units) is large enough."""
    parallel.run(lambda lo, hi: kernel(*args, lo, hi), parallel.chunks(n, work))


# ---- fused_bn, generated from the op table's formulas ------------------------------------------

# Functions whose formulas stay on NumPy: its SIMD exp, tanh and log are 3–5× faster than the scalar
# libm calls Numba makes without SVML (a tanh over 300K float32: 4.8 against 1.0 ms).
_VECTOR_ONLY = {"exp", "expm1", "log", "log1p", "sqrt", "tanh", "erf", "sigmoid", "softplus"}


def _calls(e: Expr) -> set[str]:
    """The functions and comparison operators of a formula."""
    found = {e.name} if e.kind in ("call", "cmp") else set()
    for a in e.args:
        found |= _calls(a)
    return found


# What makes NumPy take several passes where a loop takes one: the masks of piecewise formulas
# (comparisons, where, min/max/clip, abs). A purely arithmetic derivative (tanh's 1 − y², sigmoid's
# y·(1 − y)) measured the same either way (tanh at 64×6×28×28: 0.29 against 0.26 ms), not worth
# importing Numba for (1.5 s on a busy machine, LeNet-5's whole training is 6–18 s).
_PIECEWISE = {">", "<", ">=", "<=", "where", "min", "max", "clip", "abs"}


@lru_cache(maxsize=None)
def has_bn_loop(op: str) -> bool:
    """Whether BatchNorm followed by op runs as generated loops (fused_bn): a piecewise derivative
    and a forward formula, neither with exp, tanh & co."""
    f = OPS[op].formula
    calls = set() if f is None else _calls(f.grad) | _calls(f.fwd)
    return f is not None and bool(_calls(f.grad) & _PIECEWISE) and not calls & _VECTOR_ONLY


def _scalar(e: Expr, t: str) -> str:
    """e as a scalar Numba expression over xv, yv and p_<parameter>, its numbers of type t; min, max
    and clip propagate NaN as NumPy's do (_min and _max of the generated modules)."""
    if e.kind == "num":
        return f"{t}({'np.inf' if e.value == float('inf') else repr(e.value)})"
    if e.kind == "var":
        return {"x": "xv", "y": "yv"}.get(e.name, f"p_{e.name}")
    a = [_scalar(v, t) for v in e.args]
    if e.kind == "neg":
        return f"(-{a[0]})"
    if e.kind == "bin":
        return f"({a[0]} {e.name} {a[1]})"
    if e.kind == "cmp":  # 1 or 0 of type t, as NumPy's boolean masks multiply
        return f"({t}(1.0) if {a[0]} {e.name} {a[1]} else {t}(0.0))"
    if e.name in ("min", "max"):
        return f"_{e.name}({a[0]}, {a[1]})"
    if e.name == "clip":
        return f"_min(_max({a[0]}, {a[1]}), {a[2]})"
    if e.name == "abs":
        return f"abs({a[0]})"
    if e.name == "where":
        return f"({a[1]} if {a[0]} != 0 else {a[2]})"
    raise KeyError(e.name)


def cache_root() -> Path:
    """Where generated code and its compiled forms live: $CNNC_CACHE_DIR, else ~/.cache/cnnc."""
    return Path(os.environ.get("CNNC_CACHE_DIR") or Path.home() / ".cache" / "cnnc")


def _cache_dir() -> Path:
    """Where generated loop modules and Numba's cache of them live."""
    return cache_root() / "numba"


# NumPy's clip and its one-sided forms (np.clip(v, c, None)) keep a NaN and, on a tie, return the
# bound: written out here, since Python's min and max in Numba drop a NaN in the first argument
_HEADER = ["# generated by cnnc.backends.numpy.jit from the op table's formula; safe to delete",
           "import numpy as np", "from numba import njit", "",
           "@njit(inline='always')", "def _max(a, b):", "    return a if a != a or a > b else b", "",
           "@njit(inline='always')", "def _min(a, b):", "    return a if a != a or a < b else b", ""]


def _source(op: str, loops) -> str:
    """A generated module's text: the header, then the lines loops(t, params, render) gives for each
    float dtype t, with the formula's parameters as arguments (", p_slope", or "") and render(e) a
    formula expression as a scalar expression of that dtype."""
    params = "".join(f", p_{p}" for p in OPS[op].formula.params)
    lines = list(_HEADER)
    for t in ("float32", "float64"):
        lines += loops(t, params, lambda e, t=t: _scalar(e, "np." + t))
    return "\n".join(lines)


def _bn_source(op: str) -> str:
    """fused_bn's loops for activation op, per dtype t: forward_t, y = f(x·a + b (+ r)) per channel,
    and grad_sums_t, g = dy·f'(z, y) with z = x·a + b (+ r), then Σ g and Σ g·(x − μ) per channel;
    `mode` 1 adds the residual r. The per-element work is in row functions compiled without
    fast-math, so z, y and g have the bits of the unfused kernels (bn_apply, the add, the
    activation, the gradient loop); the sums are jit_loops.bn_grad_sums' loop, with its flags, over
    each row of g while it is in the cache."""
    f = OPS[op].formula

    def loops(t, params, render):
        lines = []
        for mode in (0, 1):
            z = ["        xv = src[i] * av + bv"] + (["        xv = xv + rr[i]"] if mode else [])
            lines += ['@njit(cache=True, error_model="numpy")',
                      f"def _forward_row{mode}_{t}(src, dst, rr, av, bv{params}):",
                      "    for i in range(dst.size):", *z,
                      f"        dst[i] = {render(f.fwd)}", "",
                      '@njit(cache=True, error_model="numpy")',
                      f"def _grad_row{mode}_{t}(src, yr, dr, gr, rr, av, bv{params}):",
                      "    for i in range(gr.size):", *z,
                      "        yv = yr[i]",
                      f"        gr[i] = dr[i] * {render(f.grad)}", ""]
        return lines + [
            '@njit(nogil=True, cache=True, error_model="numpy")',
            f"def forward_{t}(x, a, b, y, res, mode{params}, lo, hi):",
            "    n, c, length = x.shape",
            "    for pc in range(lo, hi):",
            "        bi, ci = pc // c, pc % c",
            "        if mode:",
            f"            _forward_row1_{t}(x[bi, ci], y[bi, ci], res[bi, ci], a[ci], b[ci]{params})",
            "        else:",
            f"            _forward_row0_{t}(x[bi, ci], y[bi, ci], x[bi, ci], a[ci], b[ci]{params})", "",
            '@njit(nogil=True, cache=True, fastmath={"reassoc"}, error_model="numpy")',
            f"def grad_sums_{t}(x, y, dy, a, b, res, mode, mx, zero, g, dsum, dxsum{params}, lo, hi):",
            "    n, c, length = x.shape",
            "    for ci in range(lo, hi):",
            "        s = 0.0",
            "        sx = 0.0",
            "        m = mx[ci]",
            "        for bi in range(n):",
            "            xr, gr = x[bi, ci], g[bi, ci]",
            "            if mode:",
            f"                _grad_row1_{t}(xr, y[bi, ci], dy[bi, ci], gr, res[bi, ci], a[ci], b[ci]{params})",
            "            else:",
            f"                _grad_row0_{t}(xr, y[bi, ci], dy[bi, ci], gr, xr, a[ci], b[ci]{params})",
            "            t = zero",
            "            tx = zero",
            "            for i in range(length):",
            "                t += gr[i]",
            "                tx += gr[i] * (xr[i] - m)",
            "            s += t",
            "            sx += tx",
            "        dsum[ci] = s",
            "        dxsum[ci] = sx", ""]

    return _source(op, loops)


@lru_cache(maxsize=None)
def bn_module(op: str):
    """fused_bn's generated loops for activation op (has_bn_loop); call where enabled() said yes."""
    return _generated("bn", op, _bn_source(op))


def _generated(kind: str, op: str, source: str):
    """A generated module of loops, written once under _cache_dir() and named by a hash of its
    text (Numba caches compiled code next to a module's file)."""
    name = f"cnnc_{kind}_{op}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    folder = _cache_dir()
    path = folder / f"{name}.py"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(source, encoding="utf-8")
        os.replace(tmp, path)  # atomic: another process may be writing the same file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
