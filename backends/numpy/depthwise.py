"""Depthwise convolution for the NumPy backend: groups = input channels, m filters per channel.

Each (image, channel) plane is correlated with its own m·kh·kw weights. conv.py's grouped
im2col over the whole batch builds (and pages in) a column matrix kh·kw times the input and
then runs one tiny product per plane; here the planes go in cache-sized blocks, split over the
worker threads, through reused workspaces in which every copy is one long contiguous run:

- A block of R planes is copied once into a zero workspace split into stride phases (for
  stride s, the s² sub-grids of padded rows ≡ a and columns ≡ b mod s). Each phase holds the
  block's planes back to back, each plane a grid of hq × wq (wq = ow + the kernel's reach in
  phase columns) plus a short tail. Tap (i, j) then reads one phase at the flat offset
  di·wq + dj, and for the whole block that is a single run of R·plane elements: the output is
  computed on the same flat grid, where positions outside oh × ow are garbage and dropped.
- The taps' runs are copied into a (kh·kw, R·plane) column block and one batched matmul
  (per plane m × kh·kw by kh·kw × plane) gives the block's output, cropped into y.
- Backward repacks the block's input and puts dy on the same grid (zero elsewhere): the
  weight gradient is dy · colsᵀ per plane; the input gradient is, per phase, the correlation
  of that grid with the phase's taps flipped (runs of dy at offsets −di·wq − dj: the garbage
  positions hold zeros now, so the wrap-around reads add nothing), again copies and a matmul,
  unpacked into dx. Only the input is kept for backward. With one filter per channel (m = 1) the
  weight gradient is instead one batched dot product per tap, of dy's grid with the tap's run read
  in the phase workspace itself (no column copies), and a phase of a single tap (stride 2's odd
  rows and columns, every phase at stride 3) is one product written into dx's strided view.

Measured on 2 cores (benchmarks/NOTES-cpu.md), one thread, per output: copying each tap's
strided window of the planes instead (NumPy's inner loop then one row of ow elements) took
1.03–1.2× the forward's time, and with col2im adds of the windows for dx 1.7–3.4× the
backward's; broadcast multiply-adds of the shifted runs times the per-plane weights
(2·kh·kw − 1 passes over the block) 1.1–1.5× the forward; an einsum over the taps 5–20×.
Against grouped im2col, MobileNetV2's ten depthwise shapes at batch 32 went from 380 to 190 ms
forward and 850 to 470 ms backward (PyTorch: 85 and 180 ms).

With a C compiler (`CNNC_JIT` not 0) and one filter per channel, the same layout runs as C a plane
at a time (cdepthwise.py); this module's NumPy code stays the reference, and what channel
multipliers take.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import cdepthwise, parallel

# One block's column workspace. 4 MiB measured best on 2 cores, 1.8× faster than 1 MiB although
# L2 is 512 KiB: with two threads, NumPy calls shorter than ~100 µs mostly wait for the GIL
# handover, and a block makes some 20 calls.
BLOCK_BYTES = 1 << 22
# Blocks below which one thread does it all: with fewer, two threads measured slower (GIL handovers
# again), with more up to 1.4× faster.
THREAD_MIN_BLOCKS = 24
# Stride phases of the input gradient with at most this many taps (a 3×3 kernel at stride 2: the
# phase of odd rows and columns) go straight into dx (`_direct_phase`). One tap: one product instead
# of a copy, a matmul per plane and the unpacking; with two, the products read strided windows and
# measured no faster than the copies and the matmul.
DIRECT_TAPS = 1


def is_depthwise(node, c: int) -> bool:
    """One group per input channel (each filter reads one channel), more than one channel."""
    return node.attrs.groups == c > 1


def _phase_slices(phase: int, pad: int, stride: int, grid: int, size: int):
    """(grid slice, input slice) along one axis: grid index u holds padded index u·stride + phase,
    that is input index u·stride + phase − pad; None when no input index lands in the grid."""
    u0 = max(0, -(-(pad - phase) // stride))
    x0 = u0 * stride + phase - pad
    if x0 >= size or u0 >= grid:
        return None
    count = min(grid - u0, -(-(size - x0) // stride))
    return slice(u0, u0 + count), slice(x0, x0 + (count - 1) * stride + 1, stride)


def geometry(node, h: int, w: int) -> "Geometry":
    """The Geometry of node's conv on h × w planes, made once per shape (it runs at every call)."""
    a = node.attrs
    pads = tuple(node.pads) if node.pads is not None else (0, 0, 0, 0)
    return _geometry(tuple(a.kernel), tuple(a.stride), tuple(a.dilation), tuple(node.out_shape), pads, h, w)


@lru_cache(maxsize=256)
def _geometry(*key) -> "Geometry":
    return Geometry(*key)


class Geometry:
    """Where each tap reads in the phase workspace, and how planes are packed into it."""

    def __init__(self, kernel, stride, dilation, out_shape, pads, h: int, w: int):
        kh, kw = kernel
        sh, sw = stride
        dh, dw = dilation
        self.stride = stride
        self.k, self.oh, self.ow = out_shape
        top, _, left, _ = pads
        self.h, self.w, self.ntaps = h, w, kh * kw
        di = [i * dh // sh for i in range(kh)]
        dj = [j * dw // sw for j in range(kw)]
        self.hq, self.wq = self.oh + di[-1], self.ow + dj[-1]
        self.reach = di[-1] * self.wq + dj[-1]  # the largest tap offset
        # a plane's grid and a tail: the garbage columns of its last row read up to dj[-1] past it
        self.plane = self.hq * self.wq + dj[-1]
        rows = sorted({i * dh % sh for i in range(kh)})
        cols = sorted({j * dw % sw for j in range(kw)})
        self.phases = [(ra, cb) for ra in rows for cb in cols]
        index = {p: n for n, p in enumerate(self.phases)}
        # per tap, row-major as the weight's kh·kw axis: (phase, flat offset of its run)
        self.taps = [(index[(i * dh % sh, j * dw % sw)], di[i] * self.wq + dj[j])
                     for i in range(kh) for j in range(kw)]
        self.placements = []  # (phase, grid rows, grid cols, input rows, input cols), nonempty only
        covered = np.zeros((h, w), dtype=bool)
        for p, (ra, cb) in enumerate(self.phases):
            rs = _phase_slices(ra, top, sh, self.hq, h)
            cs = _phase_slices(cb, left, sw, self.wq, w)
            if rs is not None and cs is not None:
                self.placements.append((p, rs[0], cs[0], rs[1], cs[1]))
                covered[rs[1], cs[1]] = True
        # input elements no window reads (floor rounding's tail, strides past the kernel): zero gradient
        self.unread = None if covered.all() else ~covered

        # the same as arrays, for jit_loops' depthwise loops
        self.place = np.array([(p, gr.start, gc.start, xr.start, xc.start, gr.stop - gr.start, gc.stop - gc.start)
                               for p, gr, gc, xr, xc in self.placements], dtype=np.int64).reshape(-1, 7)
        self.tap_phase = np.array([p for p, _ in self.taps], dtype=np.int64)
        self.tap_off = np.array([o for _, o in self.taps], dtype=np.int64)
        self.length, self.cells = self.plane + self.reach, self.hq * self.wq

    def block(self, rows_per_plane: int, itemsize: int) -> int:
        """Planes per block, for column workspaces of `rows_per_plane` runs."""
        return max(1, BLOCK_BYTES // (rows_per_plane * self.plane * itemsize))

    def grid(self, flat: np.ndarray, r: int, start: int = 0) -> np.ndarray:
        """The (r, hq, wq) plane grids of a flat block run beginning at `start`."""
        return flat[start:start + r * self.plane].reshape(r, self.plane)[:, :self.hq * self.wq].reshape(
            r, self.hq, self.wq)


def _pack(g: Geometry, x_rows: np.ndarray, ws: np.ndarray) -> None:
    """x_rows (R, H, W) into the phase workspace ws (phases, ≥R·plane + reach). Only the grids'
    interiors are written, the same positions in every block, so the zero borders stay."""
    r = x_rows.shape[0]
    for p, gr, gc, xr, xc in g.placements:
        g.grid(ws[p], r)[:, gr, gc] = x_rows[:, xr, xc]


def _thread_slices(planes: int, step: int) -> list[tuple[int, int]]:
    if -(-planes // step) < THREAD_MIN_BLOCKS:
        return [(0, planes)]
    return parallel.chunks(planes, float("inf"))


def _plane_weights(weight: np.ndarray, n: int, c: int, dtype) -> np.ndarray:
    """(N·C, m, kh·kw): the weights of each (image, channel) plane's m outputs."""
    k, _, kh, kw = weight.shape
    w = weight.astype(dtype, copy=False).reshape(c, k // c, kh * kw)
    return np.ascontiguousarray(np.broadcast_to(w, (n, *w.shape)).reshape(n * c, k // c, kh * kw))


def _per_plane(cols: np.ndarray, rows: int, r: int, plane: int) -> np.ndarray:
    """(r, rows, plane) view of the first `rows` runs of a (≥rows, ≥r·plane) column block."""
    return cols[:rows, :r * plane].reshape(rows, r, plane).transpose(1, 0, 2)


def _gather_taps(g: Geometry, planes: np.ndarray, ws: np.ndarray, cols: np.ndarray, span: int) -> None:
    """cols[t, :span] = tap t of every position of a block of planes: packed into the phase
    workspace, each tap is then one contiguous run."""
    _pack(g, planes, ws)
    for t, (p, off) in enumerate(g.taps):
        cols[t, :span] = ws[p, off:off + span]


def _compiled(x: np.ndarray, m: int) -> bool:
    """The C kernels (cdepthwise.py) run this depthwise conv: one filter per channel, float, a C compiler."""
    return m == 1 and cdepthwise.available(x.dtype)


def forward(node, x: np.ndarray, weight: np.ndarray, after=None) -> np.ndarray:
    """y (N, m·C, oh, ow): x (N, C, H, W) correlated with weight (m·C, 1, kh, kw), no bias.
    `after`: a fused conv's epilogue, which the C kernels run plane by plane (cdepthwise.forward)."""
    n, c, h, w = x.shape
    g = geometry(node, h, w)
    if _compiled(x, g.k // c):
        y = cdepthwise.forward(g, x, weight, after)
        if y is not None:
            return y
    m, planes, t_ = g.k // c, n * c, g.ntaps
    xr = np.ascontiguousarray(x).reshape(planes, h, w)
    wr = _plane_weights(weight, n, c, x.dtype)
    y = np.empty((n, g.k, g.oh, g.ow), dtype=x.dtype)
    yr = y.reshape(planes, m, g.oh, g.ow)
    step = g.block(t_ + m, x.itemsize)
    dtype = x.dtype

    def part(lo, hi):
        rows = min(step, hi - lo)
        ws = np.zeros((len(g.phases), rows * g.plane + g.reach), dtype=dtype)
        cols = np.empty((t_, rows * g.plane), dtype=dtype)
        out = np.empty((rows, m, g.plane), dtype=dtype)
        for b0 in range(lo, hi, step):
            b1 = min(b0 + step, hi)
            r, span = b1 - b0, (b1 - b0) * g.plane
            _gather_taps(g, xr[b0:b1], ws, cols, span)
            np.matmul(wr[b0:b1], _per_plane(cols, t_, r, g.plane), out=out[:r])
            yr[b0:b1] = out[:r, :, :g.hq * g.wq].reshape(r, m, g.hq, g.wq)[:, :, :g.oh, :g.ow]

    parallel.run(part, _thread_slices(planes, step))
    return y


def backward(node, x: np.ndarray, dy: np.ndarray, weight: np.ndarray, need_dx: bool = True):
    """(dx or None, dweight) of `forward` at x for the output gradient dy."""
    n, c, h, w = x.shape
    g = geometry(node, h, w)
    if _compiled(dy, g.k // c):
        got = cdepthwise.backward(g, x, dy, weight, need_dx)
        if got is not None:
            return got
    m, planes, t_ = g.k // c, n * c, g.ntaps
    dtype = dy.dtype
    xr = np.ascontiguousarray(x).reshape(planes, h, w)
    dyr = np.ascontiguousarray(dy).reshape(planes, m, g.oh, g.ow)
    wr = _plane_weights(weight, n, c, dtype)
    # per phase: its taps, their offsets, their weights per plane ordered (tap, filter) as the runs,
    # and whether its gradient is summed straight into dx (few taps, one filter per channel)
    by_phase = []
    for p, *_ in g.placements if need_dx else ():
        taps = [t for t, (q, _) in enumerate(g.taps) if q == p]
        wp = np.ascontiguousarray(wr[:, :, taps].transpose(0, 2, 1)).reshape(planes, 1, len(taps) * m)
        by_phase.append((p, taps, [g.taps[t][1] for t in taps], wp, m == 1 and len(taps) <= DIRECT_TAPS))
    # one filter per channel: dW by a dot product per tap over the phase workspace itself, no columns
    dw_dots = m == 1
    runs = max([0 if dw_dots else t_] + [len(offs) * m for _, _, offs, _, direct in by_phase if not direct])
    dw_planes = np.empty((planes, m, t_), dtype=dtype)
    dx = np.empty((n, c, h, w), dtype=dtype) if need_dx else None
    dxr = dx.reshape(planes, h, w) if need_dx else None
    step = g.block(runs + m, dtype.itemsize)

    def part(lo, hi):
        rows = min(step, hi - lo)
        ws = np.zeros((len(g.phases), rows * g.plane + g.reach), dtype=dtype)
        cols = np.empty((runs, rows * g.plane), dtype=dtype) if runs else None
        # dy on the grid, `reach` zeros in front for the input gradient's backward offsets
        dyw = np.zeros((m, g.reach + rows * g.plane), dtype=dtype)
        dpw = np.empty((rows, 1, g.plane), dtype=dtype)
        for b0 in range(lo, hi, step):
            b1 = min(b0 + step, hi)
            r, span = b1 - b0, (b1 - b0) * g.plane
            for j in range(m):
                g.grid(dyw[j], r, g.reach)[:, :g.oh, :g.ow] = dyr[b0:b1, j]
            dyg = dyw[:, g.reach:g.reach + span].reshape(m, r, g.plane).transpose(1, 0, 2)
            # dW[plane] = dy[plane] · cols[plane]ᵀ: (m, plane) by (plane, kh·kw)
            if dw_dots:
                _pack(g, xr[b0:b1], ws)
                for t, (p, off) in enumerate(g.taps):
                    np.matmul(dyg, ws[p, off:off + span].reshape(r, g.plane, 1), out=dw_planes[b0:b1, :, t:t + 1])
            else:
                _gather_taps(g, xr[b0:b1], ws, cols, span)
                np.matmul(dyg, _per_plane(cols, t_, r, g.plane).transpose(0, 2, 1), out=dw_planes[b0:b1])
            for p, taps, offs, wp, direct in by_phase:
                if direct:
                    _direct_phase(g, p, taps, offs, wr[b0:b1, 0], dyw[0], dxr[b0:b1], r)
                    continue
                # the phase's gradient: Σ_taps w · dy shifted back by the tap's offset
                for t, off in enumerate(offs):
                    for j in range(m):
                        cols[t * m + j, :span] = dyw[j, g.reach - off:g.reach - off + span]
                np.matmul(wp[b0:b1], _per_plane(cols, len(offs) * m, r, g.plane), out=dpw[:r])
                for q, gr, gc, xr_, xc in g.placements:
                    if q == p:
                        dxr[b0:b1, xr_, xc] = g.grid(dpw.reshape(-1), r)[:, gr, gc]
            if need_dx and g.unread is not None:
                dxr[b0:b1][:, g.unread] = 0.0

    parallel.run(part, _thread_slices(planes, step))
    dweight = dw_planes.reshape(n, c * m, t_).sum(axis=0).reshape(weight.shape)
    return dx, dweight


def _direct_phase(g: Geometry, p: int, taps, offs, w, dyw: np.ndarray, dxr: np.ndarray, r: int) -> None:
    """A phase's input gradient Σ_taps w · (dy shifted back by the tap's offset), summed by broadcast
    products straight into dx's strided view of that phase (one filter per channel): for a phase of
    one or two taps cheaper than copying the runs and a matmul per plane, then unpacking."""
    for q, gr, gc, xr_, xc in g.placements:
        if q != p:
            continue
        dest = dxr[:, xr_, xc]
        terms = [g.grid(dyw, r, g.reach - off)[:, gr, gc] for off in offs]
        wcols = [w[:, t, None, None] for t in taps]
        if len(terms) == 1:
            np.multiply(terms[0], wcols[0], out=dest)
            continue
        acc = terms[0] * wcols[0]
        for term, wc in zip(terms[1:-1], wcols[1:-1]):
            acc += term * wc
        np.add(acc, terms[-1] * wcols[-1], out=dest)
