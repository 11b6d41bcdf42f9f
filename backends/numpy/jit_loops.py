"""The NumPy backend's compiled loops (Numba): kernels that NumPy can only write as many passes.

Imported only through `jit.py`, which checks that Numba is installed and `CNNC_JIT` is not 0;
the NumPy kernels stay the reference and the fallback. Every loop is generic over float32 and
float64 (Numba compiles one version per argument types, cached on disk with `cache=True`, so a
second process loads instead of compiling) and runs its outer loop over Numba's threads
(`prange`). Arrays arrive C-contiguous. `error_model="numpy"` drops the division-by-zero checks
that kept LLVM from vectorising the loops (a depthwise 3×3 forward 1.9 → 1.4 ns an output).

- BatchNorm: per-channel statistics (each (image, channel) row summed in the input's dtype,
  the rows combined in float64; the mean, then the centred sum of squares), the normalisation
  y = x·a + b in one pass, and backward's Σ dy and Σ dy·x in one pass over dy and x, then
  dx = k·dy + b·x + c in another. NumPy makes five calls a block forward and six backward.

What did not go here, measured against the NumPy kernels (benchmarks/NOTES-cpu.md): a direct
convolution with the output channels innermost (LeNet-5 and ResNet-20 shapes 3–5× slower than
im2col or shifted windows with BLAS), one-pass pools (2× slower than NumPy's strided adds), and a
direct depthwise convolution that skips the padding (MobileNetV2's shapes: forward 1.0–1.7×
and backward 1.5–2.3× depthwise.py's time, faster only at stride 1 on 56² maps and larger):
without SIMD transcendentals (no SVML) and with LLVM vectorising only the simplest loops,
a compiled loop wins where NumPy's cost is its number of passes, not where it calls BLAS or
already streams through memory once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# reassociation lets LLVM vectorise the reductions (dot products over channels); nothing else is
# relaxed: no contraction into fused multiply-adds either, since fused_bn's generated loops
# (jit.py) recompute the normalisation x·a + b inside a reassociating loop (Numba's flags reach
# the row functions it inlines there), and a contracted x·a + b would not have bn_apply's bits
_FAST = {"reassoc"}


# ---- BatchNorm --------------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def bn_stats(x, zero, mx, mean, var):
    """Per-channel mean and biased variance (float64) of x (N, C, L): each (image, channel) row
    summed in x's dtype (`zero` is a 0 of it; LLVM vectorises the sum into partial sums), the rows
    combined in float64; then the centred sum of squares the same way, about the mean in x's dtype
    (`mx`, (C,), a workspace): no cancellation of a one-pass sum of squares."""
    n, c, length = x.shape
    count = n * length
    for ci in prange(c):
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


@njit(parallel=True, cache=True, error_model="numpy")
def bn_apply(x, a, b, y):
    """y (N, C, L) = x·a + b, a and b per channel (of x's dtype)."""
    n, c, length = x.shape
    for pc in prange(n * c):
        bi, ci = pc // c, pc % c
        av, bv = a[ci], b[ci]
        src, dst = x[bi, ci], y[bi, ci]
        for t in range(length):
            dst[t] = src[t] * av + bv


@njit(parallel=True, cache=True, fastmath=_FAST, error_model="numpy")
def bn_grad_sums(x, g, mx, zero, dsum, dxsum):
    """Per channel: Σ g and Σ g·(x − μ) over (N, L), per row in x's dtype, over rows in float64
    (`mx`: the channels' means in x's dtype). Centring inside the loop keeps Σ g·x̂ free of the
    cancellation of Σ g·x − μ·Σ g, which float32 rows lose to when |μ| is many σ."""
    n, c, length = x.shape
    for ci in prange(c):
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


@njit(parallel=True, cache=True, error_model="numpy")
def bn_grad_apply(g, x, k, bx, cc, dx):
    """dx (N, C, L) = k·g + bx·x + cc per channel (of x's dtype)."""
    n, c, length = x.shape
    for pc in prange(n * c):
        bi, ci = pc // c, pc % c
        kv, bv, cv = k[ci], bx[ci], cc[ci]
        gr, xr, out = g[bi, ci], x[bi, ci], dx[bi, ci]
        for t in range(length):
            out[t] = kv * gr[t] + bv * xr[t] + cv

