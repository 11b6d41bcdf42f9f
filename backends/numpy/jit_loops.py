"""The NumPy backend's compiled loops (Numba): kernels that NumPy can only write as many passes.

Imported only through `jit.py`, which checks that Numba is installed and `CNNC_JIT` is not 0;
the NumPy kernels stay the reference and the fallback. Every loop is generic over float32 and
float64 (Numba compiles one version per argument types, cached on disk with `cache=True`, so a
second process loads instead of compiling) and runs a range [lo, hi) of its outer loop, serially,
without the GIL (`nogil`): `jit.run` splits the range over the backend's own worker threads
(`parallel.py`), the ones the NumPy kernels use. Arrays arrive C-contiguous. `error_model="numpy"` drops the division-by-zero checks
that kept LLVM from vectorising the loops (a depthwise 3×3 forward 1.9 → 1.4 ns an output).

- BatchNorm: per-channel statistics (each (image, channel) row summed in the input's dtype,
  the rows combined in float64; the mean, then the centred sum of squares), the normalisation
  y = x·a + b in one pass, and backward's Σ dy and Σ dy·x in one pass over dy and x, then
  dx = k·dy + b·x + c in another. NumPy makes five calls a block forward and six backward.
- Depthwise convolution with one filter per channel: depthwise.py's flat phase layout a plane at
  a time, in per-thread workspaces that stay in the cache; forward 1.1–3.5× and backward 1.7–3.8×
  faster than depthwise.py on MobileNetV2's and EfficientNet-B0's shapes at batch 32.

Indexing: every hot loop reads slices indexed from 0 by its range variable (`run = a[o:o + n]`,
then `run[k]`), never `a[o + k]`: Numba wraps negative indices, and the check on an index LLVM
cannot prove non-negative kept it from vectorising (the depthwise loops ran 2.5× slower than the
NumPy kernel written that way, and 2–3.5× faster written with slices).

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



# ---- depthwise convolution, one filter per channel ---------------------------------------------
# depthwise.py's flat phase layout, a plane at a time in per-thread workspaces that stay in the
# cache: the plane is packed into its stride phases (zero borders), each tap is then a contiguous
# run of the phase at a fixed offset, and the output is the taps' multiply-adds over the plane's
# flat grid (hq·wq positions, the columns past ow garbage and dropped). `place` rows are
# (phase, grid row, grid column, input row, input column, rows, columns) of depthwise.Geometry's
# placements; taps are (phase, offset) per weight tap, row-major.

_DW_FAST = {"reassoc", "contract"}


@njit(cache=True, error_model="numpy")
def _dw_pack(src, ws, place, wq, sh, sw):
    for q in range(place.shape[0]):
        p, gr0, gc0, xr0, xc0, nr, nc = place[q]
        for u in range(nr):
            row = src[xr0 + u * sh, xc0:]
            base = (gr0 + u) * wq + gc0
            dst = ws[p, base:base + nc]
            for v in range(nc):
                dst[v] = row[v * sw]


@njit(cache=True, fastmath=_DW_FAST, error_model="numpy")
def _dw_taps(src, wc, sel, rows, offs, grid, acc):
    """acc[k] = Σ over the taps t in sel of wc[t]·src[rows[t], offs[t] + k], three taps a pass (fewer
    loads and stores of acc); the runs are slices, indexed from 0: no wrap-around checks, which
    kept LLVM from vectorising."""
    acc[:] = 0
    n = sel.shape[0]
    i = 0
    while i + 3 <= n:
        t0, t1, t2 = sel[i], sel[i + 1], sel[i + 2]
        w0, w1, w2 = wc[t0], wc[t1], wc[t2]
        r0 = src[rows[t0], offs[t0]:offs[t0] + grid]
        r1 = src[rows[t1], offs[t1]:offs[t1] + grid]
        r2 = src[rows[t2], offs[t2]:offs[t2] + grid]
        for k in range(grid):
            acc[k] += w0 * r0[k] + w1 * r1[k] + w2 * r2[k]
        i += 3
    while i < n:
        t0 = sel[i]
        w0 = wc[t0]
        r0 = src[rows[t0], offs[t0]:offs[t0] + grid]
        for k in range(grid):
            acc[k] += w0 * r0[k]
        i += 1


@njit(cache=True, fastmath=_DW_FAST, error_model="numpy")
def _dw_dots(gg, ws, tap_phase, tap_off, grid, out):
    """out[t] = Σ_k gg[k]·ws[phase t, off t + k], three taps a pass over gg."""
    taps = out.shape[0]
    t = 0
    while t < taps:
        if t + 3 <= taps:
            r0 = ws[tap_phase[t], tap_off[t]:tap_off[t] + grid]
            r1 = ws[tap_phase[t + 1], tap_off[t + 1]:tap_off[t + 1] + grid]
            r2 = ws[tap_phase[t + 2], tap_off[t + 2]:tap_off[t + 2] + grid]
            s0 = gg[0] * 0
            s1 = s0
            s2 = s0
            for k in range(grid):
                v = gg[k]
                s0 += v * r0[k]
                s1 += v * r1[k]
                s2 += v * r2[k]
            out[t], out[t + 1], out[t + 2] = s0, s1, s2
            t += 3
        else:
            r0 = ws[tap_phase[t], tap_off[t]:tap_off[t] + grid]
            s0 = gg[0] * 0
            for k in range(grid):
                s0 += gg[k] * r0[k]
            out[t] = s0
            t += 1


@njit(nogil=True, cache=True, fastmath=_DW_FAST, error_model="numpy")
def depthwise_forward(x, w, place, tap_phase, tap_off, phases, length, grid, wq, sh, sw, y, lo, hi):
    """y (P, oh, ow) from planes x (P, H, W) and per-channel taps w (C, T), plane i's channel i % C."""
    planes, oh, ow = y.shape
    c, taps = w.shape
    every = np.arange(taps)
    ws = np.zeros((phases, length), x.dtype)
    acc = np.empty(grid, x.dtype)
    for pl in range(lo, hi):
        _dw_pack(x[pl], ws, place, wq, sh, sw)
        wc = w[pl % c]
        _dw_taps(ws, wc, every, tap_phase, tap_off, grid, acc)
        out = y[pl]
        for i in range(oh):
            src = acc[i * wq:i * wq + ow]
            dst = out[i]
            for j in range(ow):
                dst[j] = src[j]


@njit(nogil=True, cache=True, fastmath=_DW_FAST, error_model="numpy")
def depthwise_backward(x, dy, w, place, tap_phase, tap_off, phases, length, grid, wq, reach, sh, sw,
                       need_dx, unread, dw, dx, lo, hi):
    """dw (P, T): each plane's tap gradients (summed over the batch by the caller); dx (P, H, W)
    when need_dx: per phase, the correlation of dy's grid with the phase's taps flipped, unpacked;
    input positions no window reads (unread) get zero."""
    planes, oh, ow = dy.shape
    c, taps = w.shape
    # per phase, its taps; each reads dy's grid shifted back by its offset
    phase_taps = np.zeros((phases, taps), np.int64)
    phase_count = np.zeros(phases, np.int64)
    for t in range(taps):
        p = tap_phase[t]
        phase_taps[p, phase_count[p]] = t
        phase_count[p] += 1
    back_off = reach - tap_off
    zeros = np.zeros(taps, np.int64)
    ws = np.zeros((phases, length), x.dtype)
    g = np.zeros(reach + length, x.dtype)  # dy on the grid, `reach` zeros in front, zeros past ow
    g2 = g.reshape(1, -1)
    acc = np.empty(grid, x.dtype)
    for pl in range(lo, hi):
        _dw_pack(x[pl], ws, place, wq, sh, sw)
        d = dy[pl]
        gg = g[reach:reach + grid]
        for i in range(oh):
            gi = gg[i * wq:i * wq + ow]
            for j in range(ow):
                gi[j] = d[i, j]
        _dw_dots(gg, ws, tap_phase, tap_off, grid, dw[pl])
        if not need_dx:
            continue
        wc = w[pl % c]
        out = dx[pl]
        if unread:
            out[:, :] = 0
        for p in range(phases):
            _dw_taps(g2, wc, phase_taps[p, :phase_count[p]], zeros, back_off, grid, acc)
            for q in range(place.shape[0]):
                pq, gr0, gc0, xr0, xc0, nr, nc = place[q]
                if pq != p:
                    continue
                for u in range(nr):
                    row = out[xr0 + u * sh, xc0:]
                    base = (gr0 + u) * wq + gc0
                    src = acc[base:base + nc]
                    for v in range(nc):
                        row[v * sw] = src[v]
