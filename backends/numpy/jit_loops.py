"""The NumPy backend's compiled loops (Numba): kernels that NumPy can only write as many passes.

Imported only through `jit.py`, which checks that Numba is installed and `CNNC_JIT` is not 0;
the NumPy kernels stay the reference and the fallback. Every loop is generic over float32 and
float64 (Numba compiles one version per argument types, cached on disk with `cache=True`, so a
second process loads instead of compiling) and runs a range [lo, hi) of its outer loop, serially,
without the GIL (`nogil`): `jit.run` splits the range over the backend's own worker threads
(`parallel.py`), the ones the NumPy kernels use. Arrays arrive C-contiguous. `error_model="numpy"` drops the division-by-zero checks
that kept LLVM from vectorising the loops.

- BatchNorm: per-channel statistics (each (image, channel) row summed in the input's dtype,
  the rows combined in float64; the mean, then the centred sum of squares), the normalisation
  y = x·a + b in one pass, and backward's Σ dy and Σ dy·x in one pass over dy and x, then
  dx = k·dy + b·x + c in another. NumPy makes five calls a block forward and six backward.

Indexing: every hot loop reads slices indexed from 0 by its range variable (`run = a[o:o + n]`,
then `run[k]`), never `a[o + k]`: Numba wraps negative indices, and the check on an index LLVM
cannot prove non-negative kept it from vectorising (loops written that way ran 2.5× slower than the
NumPy kernels, and 2–3.5× faster written with slices).

What did not go here, measured against the NumPy kernels (benchmarks/NOTES-cpu.md): a direct
convolution with the output channels innermost (LeNet-5 and ResNet-20 shapes 3–5× slower than
im2col or shifted windows with BLAS; written before the indexing rule above was known), and
one-pass pools (2× slower than NumPy's strided adds): without SIMD transcendentals (no SVML) and
with LLVM vectorising only the simplest loops, a compiled loop wins where NumPy's cost is its
number of passes or its copies, not where it calls BLAS or already streams through memory once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# reassociation lets LLVM vectorise the reductions (dot products over channels); nothing else is
# relaxed: no contraction into fused multiply-adds either, since fused_bn's generated loops
# (jit.py) recompute the normalisation x·a + b inside a reassociating loop (Numba's flags reach
# the row functions it inlines there), and a contracted x·a + b would not have bn_apply's bits
_FAST = {"reassoc"}


# ---- BatchNorm --------------------------------------------------------------------------------

@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def bn_stats(x, zero, mx, mean, var, lo, hi):
    """Per-channel mean and biased variance (float64) of x (N, C, L): each (image, channel) row
    summed in x's dtype (`zero` is a 0 of it; LLVM vectorises the sum into partial sums), the rows
    combined in float64; then the centred sum of squares the same way, about the mean in x's dtype
    (`mx`, (C,), a workspace): no cancellation of a one-pass sum of squares."""
    n, c, length = x.shape
    count = n * length
    for ci in range(lo, hi):
        s = 0.0
        for b in range(n):
            row = x[b, ci]
            t = zero
            for i in range(length):
                t += row[i]
            s += t
        mu = s / count
        mx[ci] = mu
        m = mx[ci]
        m2 = 0.0
        for b in range(n):
            row = x[b, ci]
            t = zero
            for i in range(length):
                d = row[i] - m
                t += d * d
            m2 += t
        mean[ci] = mu
        var[ci] = m2 / count


@njit(nogil=True, cache=True, error_model="numpy")
def bn_apply(x, a, b, y, lo, hi):
    """y (N, C, L) = x·a + b, a and b per channel (of x's dtype)."""
    n, c, length = x.shape
    for pc in range(lo, hi):
        bi, ci = pc // c, pc % c
        av, bv = a[ci], b[ci]
        src, dst = x[bi, ci], y[bi, ci]
        for t in range(length):
            dst[t] = src[t] * av + bv


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def bn_grad_sums(x, g, mx, zero, dsum, dxsum, lo, hi):
    """Per channel: Σ g and Σ g·(x − μ) over (N, L), per row in x's dtype, over rows in float64
    (`mx`: the channels' means in x's dtype). Centring inside the loop keeps Σ g·x̂ free of the
    cancellation of Σ g·x − μ·Σ g, which float32 rows lose to when |μ| is many σ."""
    n, c, length = x.shape
    for ci in range(lo, hi):
        s = 0.0
        sx = 0.0
        m = mx[ci]
        for b in range(n):
            xr, gr = x[b, ci], g[b, ci]
            t = zero
            tx = zero
            for i in range(length):
                t += gr[i]
                tx += gr[i] * (xr[i] - m)
            s += t
            sx += tx
        dsum[ci] = s
        dxsum[ci] = sx


@njit(nogil=True, cache=True, error_model="numpy")
def bn_grad_apply(g, x, k, bx, cc, dx, in_place, lo, hi):
    """dx (N, C, L) = k·g + bx·x + cc per channel (of x's dtype); in_place: g is dx itself."""
    n, c, length = x.shape
    for pc in range(lo, hi):
        bi, ci = pc // c, pc % c
        kv, bv, cv = k[ci], bx[ci], cc[ci]
        if in_place:
            _grad_apply_row_in_place(dx[bi, ci], x[bi, ci], kv, bv, cv)
        else:
            _grad_apply_row(g[bi, ci], x[bi, ci], dx[bi, ci], kv, bv, cv)


@njit(cache=True, error_model="numpy")
def _grad_apply_row(gr, xr, out, kv, bv, cv):
    for t in range(out.size):
        out[t] = kv * gr[t] + bv * xr[t] + cv


@njit(cache=True, error_model="numpy")
def _grad_apply_row_in_place(row, xr, kv, bv, cv):
    """One array argument for g and dx: given two that overlap, LLVM's run-time alias check sends
    the loop to its scalar version (jit.py's epilogue says the same)."""
    for t in range(row.size):
        row[t] = kv * row[t] + bv * xr[t] + cv
