"""Convolution and pooling kernels for the NumPy backend (NCHW, PyTorch semantics).

Stride-1 convolutions with enough channels use shifted windows: the input, zero padded and
channel-major (C × N·hp·wp, one copy), is a matrix whose column ranges are the im2col rows of
each kernel offset, so the output over the padded grid is the sum of kh·kw gemms read in
place (no im2col matrix kh·kw times the input), computed in cache-sized column blocks split
over threads; outputs at the grid's padding positions are computed and dropped. The weight
gradient and the input gradient are the same kind of sums. Other convolutions use im2col
over a strided view of the padded input and one batched matmul per call (BLAS); their input
gradient is col2im, a loop over the kh·kw kernel offsets adding
strided slices, or, for stride 1, a convolution of the padded output gradient with the
flipped kernel (half the memory traffic when filters ≥ channels). Large convolutions split
the batch over worker threads (`parallel.py`). Depthwise convolutions (one group per input
channel) have their own kernel, `depthwise.py`. Pools loop over kernel offsets too, never
over pixels or batch items.

Which algorithm a convolution runs (`algorithms`: im2col, shifted windows with the taps
stacked into one gemm or one gemm per tap, Winograd F(2×2, 3×3)) is measured on first use
by `tuner.py` and cached on disk; the thresholds below are the heuristic it starts from and
what runs with `--autotune off` and for small problems.

Output sizes always come from `node.out_shape` (it reflects `round`); the padded buffer is
sized to hold exactly the windows used, so floor rounding crops the input's tail and
ceil rounding adds an overhang (zeros for conv and avgpool, −inf for maxpool).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import blas, celementwise, cgemm, cpool, cthreads, depthwise, direct, parallel, tuner, winograd
from .blas import gemm

KERNELS_VERSION = 9  # part of the tuning cache's key: bump when an algorithm's speed changes


# ---- shared helpers ------------------------------------------------------------------------

def _placement(h, w, top, left, hp, wp):
    """Where x lands in the padded grid: (grid rows, grid cols, x rows, x cols) as slices."""
    r0, c0 = max(top, 0), max(left, 0)
    s0, t0 = max(-top, 0), max(-left, 0)
    hh, ww = min(h - s0, hp - r0), min(w - t0, wp - c0)
    return slice(r0, r0 + hh), slice(c0, c0 + ww), slice(s0, s0 + hh), slice(t0, t0 + ww)


def _pad(x: np.ndarray, top: int, left: int, hp: int, wp: int, fill: float = 0.0) -> np.ndarray:
    """x (N, C, H, W) placed at (top, left) of an (N, C, hp, wp) buffer filled with `fill`.

    Negative `top`/`left` crop the input's head; rows or columns past hp/wp are dropped.
    Returns x itself when nothing changes.
    """
    n, c, h, w = x.shape
    if top == 0 and left == 0 and hp == h and wp == w:
        return x
    out = np.full((n, c, hp, wp), fill, dtype=x.dtype)
    gr, gc, xr, xc = _placement(h, w, top, left, hp, wp)
    if gr.stop > gr.start and gc.stop > gc.start:
        out[:, :, gr, gc] = x[:, :, xr, xc]
    return out


def _unpad(dxp: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """The gradient of `_pad`: the (N, C, h, w) region of dxp at (top, left), zero where cropped."""
    n, c, hp, wp = dxp.shape
    if top == 0 and left == 0 and hp == h and wp == w:
        return dxp
    hh, ww = min(h, hp - top), min(w, wp - left)
    if hh == h and ww == w:
        return np.ascontiguousarray(dxp[:, :, top:top + h, left:left + w])
    dx = np.zeros((n, c, h, w), dtype=dxp.dtype)
    dx[:, :, :hh, :ww] = dxp[:, :, top:top + hh, left:left + ww]
    return dx


def _window(xp: np.ndarray, i: int, j: int, oh: int, ow: int, sh: int, sw: int) -> np.ndarray:
    """The (N, C, oh, ow) strided slice of xp that kernel offset (i, j) reads."""
    return xp[:, :, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]


def _pads(node) -> tuple[int, int, int, int]:
    return tuple(node.pads) if node.pads is not None else (0, 0, 0, 0)


# ---- conv ----------------------------------------------------------------------------------

def _im2col(xp: np.ndarray, groups: int, kh: int, kw: int, dh: int, dw: int, oh: int, ow: int,
            sh: int, sw: int) -> np.ndarray:
    """(N, G, Cg·kh·kw, oh·ow) columns of the padded input (one copy, through a strided view)."""
    n, c = xp.shape[:2]
    cg = c // groups
    s_n, s_c, s_h, s_w = xp.strides
    view = as_strided(xp, (n, groups, cg, kh, kw, oh, ow),
                      (s_n, cg * s_c, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w), writeable=False)
    return view.reshape(n, groups, cg * kh * kw, oh * ow)


def _conv_geometry(node):
    """(kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp), made once per node (it is asked several times a call)."""
    found = node.memo.get("conv geometry")
    if found is None:
        found = node.memo["conv geometry"] = _geometry_of(node)
    return found


def _geometry_of(node):
    a = node.attrs
    kh, kw = a.kernel
    sh, sw = a.stride
    dh, dw = a.dilation
    k, oh, ow = node.out_shape
    hp = (oh - 1) * sh + dh * (kh - 1) + 1  # rows the windows span (crops floor's tail, adds ceil's overhang)
    wp = (ow - 1) * sw + dw * (kw - 1) + 1
    return kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp


def _covers_input(node, shape) -> bool:
    """One group, no dilation, and one window that is the whole unpadded input (LeNet-5's C5):
    im2col's columns are the input, one row an image; per-image gemms were matrix-vector products
    and col2im 25 strided adds (0.57 ms of a 3.5 ms step)."""
    a = node.attrs
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    return (a.groups == 1 and (dh, dw) == (1, 1) and (oh, ow) == (1, 1) and (top, left) == (0, 0)
            and (kh, kw) == tuple(shape[2:]))


def _is_pointwise(kh, kw, sh, sw, top, left, hp, wp, h, w) -> bool:
    """A 1×1 stride-1 unpadded conv: the input is its own column matrix."""
    return kh == kw == 1 and sh == sw == 1 and top == left == 0 and hp == h and wp == w


def _conv(x: np.ndarray, weight: np.ndarray, groups: int, top: int, left: int, hp: int, wp: int,
          sh: int, sw: int, dh: int, dw: int, out: np.ndarray, split_filters: bool = False, after=None,
          each=None):
    """Correlate x with weight into `out` (N, K, oh, ow), C-contiguous; returns the columns
    (None for a pointwise conv, which reads the input as is). With `split_filters` (fewer images
    than threads: inference at batch 1) the columns are built once and each gemm is split over the
    C workers (cgemm.py), or where that is off each Python thread's gemm takes a share of every
    group's filters. `after` (one image, one group): the caller's epilogue, which the split gemm
    runs on each block of out as it is computed where `after.deferred(out)` hands it over (then
    `after.done()` is called). `each(i)` (several images, not split): run right after image i's
    gemm, while its output is in cache (the caller's epilogue on that image)."""
    n, c, h, w = x.shape
    k, cg, kh, kw = weight.shape
    _, _, oh, ow = out.shape
    kg = k // groups
    wm = weight.reshape(groups, kg, cg * kh * kw)
    if _is_pointwise(kh, kw, sh, sw, top, left, hp, wp, h, w):
        cols = None
        src = np.ascontiguousarray(x).reshape(n, groups, cg, h * w)
    else:
        cols = src = _im2col(_pad(x, top, left, hp, wp), groups, kh, kw, dh, dw, oh, ow, sh, sw)
    rows = out.reshape(n, groups, kg, oh * ow)

    def gemm(k0, k1):  # (N, G, k1 − k0, P): one BLAS gemm per batch item and group, straight into the output
        np.matmul(wm[:, k0:k1], src, out=rows[:, :, k0:k1])
    if not split_filters:
        if each is None:
            gemm(0, kg)
            return cols
        for i in range(n):
            np.matmul(wm, src[i], out=rows[i])
            each(i)
        return cols
    then = after.deferred(out) if after is not None and n == groups == 1 else None
    if then is not None and cgemm.matmul(wm[0], src[0, 0], rows[0, 0], (then.task, then.args)):
        after.done()
    elif not all(cgemm.matmul(wm[g], src[i, g], rows[i, g]) for i in range(n) for g in range(groups)):
        parallel.run(gemm, parallel.chunks(kg, float("inf")))  # cgemm off: Python threads share the filters
    return cols


# ---- shifted windows (stride 1, groups 1) -----------------------------------------------------

SHIFTED_MIN_CHANNELS = 16  # below, each gemm's inner dimension is too short for BLAS
SHIFTED_MAX_GRID = 1.2  # padded grid / output positions above which im2col is faster (measured: 16×16 maps)
BLOCK_BYTES = 1 << 20  # a column block of the output (and its input rows) stays in cache over kh·kw gemms
# Measured per layer on 2 cores (benchmarks/NOTES-cpu.md): NumPy's Winograd transforms only pay
# off when the gemms are large, the shifted windows when channels are few and maps large, and
# im2col's single gemm with a 9·C inner dimension is best for the rest.
WINOGRAD_MIN_CHANNELS = 128  # 3×3 stride 1 with this many input and output channels…
WINOGRAD_MIN_POSITIONS = 28 * 28  # …and output positions: Winograd F(2×2, 3×3)
SHIFTED_MAX_CHANNELS = 255  # above, im2col's one gemm beats kh·kw gemms
STACK_BELOW = 64  # channels under which the taps are stacked into one gemm (see _stacked)
DIRECT_MAX_CHANNELS = 64  # input and output channels up to which the heuristic takes the direct conv
MIN_BLOCK = 512  # columns: narrower gemms cost more in calls than they save in cache misses


def _use_shifted(node, c: int) -> bool:
    a = node.attrs
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    if a.groups != 1 or sh != 1 or sw != 1 or not SHIFTED_MIN_CHANNELS <= c <= SHIFTED_MAX_CHANNELS:
        return False
    return kh * kw > 1 and hp * wp <= SHIFTED_MAX_GRID * oh * ow


def _offsets(kh, kw, dh, dw, wp) -> list[int]:
    return [i * dh * wp + j * dw for i in range(kh) for j in range(kw)]


def _blocks(lo: int, hi: int, rows: int, itemsize: int):
    step = max(MIN_BLOCK, BLOCK_BYTES // (rows * itemsize))
    for b0 in range(lo, hi, step):
        yield b0, min(b0 + step, hi)


def _channel_major_padded(x, top, left, hp, wp, before: int, after: int) -> np.ndarray:
    """(C, before + N·hp·wp + after) zero buffer holding x channel-major on the padded grid."""
    n, c, h, w = x.shape
    buf = np.zeros((c, before + n * hp * wp + after), dtype=x.dtype)
    gr, gc, xr, xc = _placement(h, w, top, left, hp, wp)
    grid = buf[:, before:before + n * hp * wp].reshape(c, n, hp, wp)

    def copy(lo, hi):
        grid[lo:hi, :, gr, gc] = x[:, lo:hi, xr, xc].transpose(1, 0, 2, 3)
    parallel.run(copy, parallel.chunks(c, x.size))
    return buf


def _stack(src, offs, shift: int, b0: int, b1: int, out) -> np.ndarray:
    """Rows t·R…(t+1)·R of `out` = src[:, shift + offs[t] + b0 : … + b1] (R = src rows): the im2col
    block of these columns, built in a reused workspace from contiguous row pieces."""
    rows, width = src.shape[0], b1 - b0
    ws = out[:, :width]
    for t, off in enumerate(offs):
        ws[t * rows:(t + 1) * rows] = src[:, shift + off + b0:shift + off + b1]
    return ws


def _stacked(c: int) -> bool:
    """Few channels: one gemm over all taps (inner dimension kh·kw·C) on a per-block im2col
    workspace beats kh·kw gemms of inner dimension C; many channels: the per-tap gemms, no copies."""
    return c < STACK_BELOW


def _use_winograd(node, c: int) -> bool:
    a = node.attrs
    k, oh, ow = node.out_shape
    return (tuple(a.kernel) == (3, 3) and tuple(a.stride) == (1, 1) and tuple(a.dilation) == (1, 1)
            and a.groups == 1 and min(c, k) >= WINOGRAD_MIN_CHANNELS and min(oh, ow) >= 2
            and oh * ow >= WINOGRAD_MIN_POSITIONS)


def _stacking(method: str, c: int, k: int) -> tuple[bool, bool]:
    """Whether the forward and the backward pass of a shifted-window method stack their taps."""
    if method == "shifted_stacked":
        return True, True
    if method == "shifted_taps":
        return False, False
    return _stacked(c), _stacked(min(c, k))  # "shifted": the heuristic's, per direction


def _shifted_forward(node, x, weight, bias, method: str):
    n, c, h, w = x.shape
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    wino = method == "winograd"
    if wino:  # whole 4×4 tiles; the extra rows and columns are zeros and dropped outputs
        hp, wp = winograd.grid(oh, ow, hp, wp)
    offs = _offsets(kh, kw, dh, dw, wp)
    grid = n * hp * wp
    buf = _channel_major_padded(x, top, left, hp, wp, 0, offs[-1])
    # the backward pass reads the padded input again and the weight from its params
    saved = ("shifted", buf, x.shape, hp, wp, method)
    if wino:
        xg = buf[:, :grid].reshape(c, n, hp, wp)
        return winograd.conv3x3(xg, winograd.filter_transform(weight), oh, ow, bias), saved
    full = np.empty((k, grid), dtype=x.dtype)
    stacked = _stacking(method, c, k)[0]
    if stacked:
        flat = np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(k, kh * kw * c)  # [k, t·C + c]
    else:
        taps = _taps(weight)

    def columns(lo, hi):
        rows = k + (len(offs) * c if stacked else c)
        ws = None
        for b0, b1 in _blocks(lo, hi, rows, x.itemsize):
            if stacked:
                if ws is None:
                    ws = np.empty((len(offs) * c, b1 - b0), dtype=x.dtype)
                gemm(flat, _stack(buf, offs, 0, b0, b1, ws), full[:, b0:b1])
                continue
            for t, off in enumerate(offs):
                gemm(taps[t], buf[:, off + b0:off + b1], full[:, b0:b1], 0.0 if t == 0 else 1.0)
    parallel.run(columns, parallel.chunks(grid, k * c * kh * kw * grid))
    y = np.empty((n, k, oh, ow), dtype=x.dtype)
    view = full.reshape(k, n, hp, wp)[:, :, :oh, :ow]

    def unpack(lo, hi):  # back to N×K×oh×ow, adding the bias on the way
        out = y[:, lo:hi].transpose(1, 0, 2, 3)
        if bias is None:
            out[...] = view[lo:hi]
        else:
            np.add(view[lo:hi], bias[lo:hi].reshape(-1, 1, 1, 1), out=out)
    parallel.run(unpack, parallel.chunks(k, y.size))
    return y, saved


def _taps(weight: np.ndarray) -> np.ndarray:
    """(K, C, kh, kw) → (kh·kw, K, C): one K×C matrix per kernel offset."""
    k, c, kh, kw = weight.shape
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1)).reshape(kh * kw, k, c)


def _winograd_input_grad(dy, weight, top: int, left: int, h: int, w: int) -> np.ndarray:
    """dx of a 3×3 stride-1 conv: dy, padded by 2 less the forward's padding, correlated with
    the spatially flipped filters, input and output channels swapped (Winograd again)."""
    hg, wg = winograd.grid(h, w, h + 2, w + 2)
    k = dy.shape[1]
    dyg = _channel_major_padded(dy, 2 - top, 2 - left, hg, wg, 0, 0).reshape(k, dy.shape[0], hg, wg)
    flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    return winograd.conv3x3(dyg, winograd.filter_transform(flipped), h, w)


def _shifted_backward(node, saved, dy, weight, has_bias: bool, need_dx: bool = True):
    _, buf, (n, c, h, w), hp, wp, method = saved
    kh, kw, sh, sw, dh, dw, k, oh, ow, _, _ = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    gemm_dx = need_dx and method != "winograd"  # Winograd layers get dx from Winograd below
    offs = _offsets(kh, kw, dh, dw, wp)
    ntaps, span, grid, dtype = len(offs), offs[-1], n * hp * wp, dy.dtype
    # dy on the padded grid, zero at the dropped positions and over `span` columns in front
    dpad = np.zeros((k, span + grid), dtype=dtype)
    dgrid = dpad[:, span:].reshape(k, n, hp, wp)

    def pack(lo, hi):
        dgrid[lo:hi, :, :oh, :ow] = dy[:, lo:hi].transpose(1, 0, 2, 3)
    parallel.run(pack, parallel.chunks(k, dy.size))
    dfull = dpad[:, span:]
    dx_grid = np.empty((c, grid), dtype=dtype) if gemm_dx else None
    stacked = _stacking(method, c, k)[1]
    taps = _taps(weight)
    back = [-off for off in offs]  # dX[:, q] = Σ_t W_tᵀ dY[:, q − off_t]
    flat_t = np.ascontiguousarray(taps.transpose(2, 0, 1)).reshape(c, ntaps * k) if stacked else None

    def columns(lo, hi):
        dflat = np.empty((k, ntaps * c), dtype=dtype)  # [k, t·C + c]
        dtaps = dflat.reshape(k, ntaps, c)
        ws = wd = None
        rows = k + c + (ntaps * (c + k) if stacked else 0)
        for i, (b0, b1) in enumerate(_blocks(lo, hi, rows, dy.itemsize)):
            beta = 0.0 if i == 0 else 1.0
            if stacked:
                if ws is None:  # workspaces as wide as the first (widest) block
                    ws = np.empty((ntaps * c, b1 - b0), dtype=dtype)
                    wd = np.empty((ntaps * k, b1 - b0), dtype=dtype)
                gemm(dfull[:, b0:b1], _stack(buf, offs, 0, b0, b1, ws).T, dflat, beta)
                if gemm_dx:
                    gemm(flat_t, _stack(dpad, back, span, b0, b1, wd), dx_grid[:, b0:b1])
                continue
            for t, off in enumerate(offs):
                # dW_t += dY[:, block] · X[:, block + off]ᵀ ;  dX[:, block] += W_tᵀ · dY[:, block − off]
                gemm(dfull[:, b0:b1], buf[:, off + b0:off + b1].T, dtaps[:, t], beta)
                if gemm_dx:
                    gemm(taps[t].T, dpad[:, span - off + b0:span - off + b1], dx_grid[:, b0:b1],
                         0.0 if t == 0 else 1.0)
        return dflat
    parts = parallel.run(columns, parallel.chunks(grid, 2 * k * c * ntaps * grid))
    dflat = sum(parts[1:], parts[0])
    dparams = {"weight": np.ascontiguousarray(dflat.reshape(k, kh, kw, c).transpose(0, 3, 1, 2))}
    if has_bias:
        dparams["bias"] = celementwise.channel_sums(dy)
    if not need_dx:
        return [None], dparams
    if not gemm_dx:
        return [_winograd_input_grad(dy, weight, top, left, h, w)], dparams
    gr, gc, xr, xc = _placement(h, w, top, left, hp, wp)
    whole = (xr.stop - xr.start, xc.stop - xc.start) == (h, w)
    dx = np.empty((n, c, h, w), dtype=dtype) if whole else np.zeros((n, c, h, w), dtype=dtype)
    view = dx_grid.reshape(c, n, hp, wp)

    def unpack(lo, hi):
        dx[:, lo:hi, xr, xc] = view[lo:hi, :, gr, gc].transpose(1, 0, 2, 3)
    parallel.run(unpack, parallel.chunks(c, dx.size))
    return [dx], dparams


# ---- algorithm choice ------------------------------------------------------------------------

def algorithms(node, c: int, training: bool, dtype=np.float32) -> list[str]:
    """The algorithms that compute this convolution (not depthwise) on a C-channel input, the
    heuristic's choice first: im2col (any conv), shifted_taps and shifted_stacked (stride 1,
    groups 1, a kernel larger than 1×1), winograd (3×3, stride 1, no dilation, groups 1), direct
    (compiled C, `direct.py`: no dilation, groups 1, where a C compiler is there);
    "shifted" is the heuristic's own stacking when it differs between forward and backward."""
    a = node.attrs
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    if _use_winograd(node, c):
        first = "winograd"
    elif _use_shifted(node, c):
        fwd, bwd = _stacking("shifted", c, k)
        first = "shifted" if training and fwd != bwd else "shifted_stacked" if fwd else "shifted_taps"
    else:
        first = "im2col"
    names = [first, "im2col"]
    if a.groups == 1 and sh == sw == 1 and kh * kw > 1:
        names += ["shifted_taps", "shifted_stacked"]
        if (kh, kw, dh, dw) == (3, 3, 1, 1) and min(oh, ow) >= 2:
            names.append("winograd")
    if direct.applies(node, c, dtype) and direct.available():
        # measured faster than every gemm-based algorithm on LeNet-5's and ResNet-20's stride-1
        # layers (benchmarks/cpu_conv_algorithms.py); 1×1 stride-1 convs are one gemm already.
        # At stride 2 (about even with im2col on an AMD EPYC with AVX2), on an AVX-512 Xeon, ms
        # forward / backward, im2col → direct: ResNet-20's 1×1 shortcuts 16→32 at batch 128
        # 1.30 / 1.92 → 0.44 / 1.48, 32→64 0.72 / 1.29 → 0.27 / 1.02; its 3×3 16→32 3.74 / 10.35 →
        # 1.86 / 8.27. At batch 1 too, now that both split over the C workers (the direct conv by
        # filters, the gemm by cgemm), on an AMD EPYC with AVX-512, ms, im2col → direct:
        # MobileNetV2's and EfficientNet-B0's 3→32 stem 0.42 → 0.24 (10.8M multiply-adds: under
        # the tuner's MIN_MACS, so the heuristic decides), ResNet-50's 7×7 stem 2.75 → 1.36 and
        # its 64→64 3×3 1.99 → 1.40 (the tuner's timings). Where it is not the first choice it is
        # the second, so that the tuner's fast mode (the first three) times it: on AVX-512 it also
        # took half of the best gemm-based time on ResNet-50's 3×3 layers at batch 1 and beat
        # Winograd on 256→256 at 56×56 (78.7 against 86.2 ms at batch 8).
        first_choice = (kh * kw > 1 or sh * sw > 1) and max(c, k) <= DIRECT_MAX_CHANNELS
        names.insert(0 if first_choice else 1, "direct")
    return list(dict.fromkeys(names))


def _workspace_bytes(node, algo: str, x) -> int:
    """The largest array an algorithm adds to its input and output (and, in training, keeps for the
    backward): im2col's columns, the shifted windows' padded channel-major copy, Winograd's
    transformed input and output tiles (16 values per 2×2 outputs), the direct conv's planes."""
    n, c = x.shape[:2]
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    if algo == "im2col":
        pointwise = _is_pointwise(kh, kw, sh, sw, top, left, hp, wp, *x.shape[2:])
        return 0 if pointwise else n * c * kh * kw * oh * ow * x.itemsize
    if algo == "winograd":
        return 4 * n * (c * hp * wp + k * oh * ow) * x.itemsize
    if algo == "direct":
        return direct.planes_bytes(n, c, k, oh, ow, kh, kw, sh, sw, x.dtype)
    return n * c * hp * wp * x.itemsize  # the padded input, channel-major


def _algorithm(node, x, w, bias, ctx) -> str:
    """The algorithm for this problem: timed by the tuner on first use (forward, and backward when
    training), the heuristic's under `--autotune off` and for small problems; remembered in the
    node's memo for its shape, dtype, mode, threads and what may run (choosing took ~3 µs a call)."""
    key = ("algorithm", x.shape, x.dtype.char, ctx.training, ctx.need_input_grad, tuner.mode(), direct.available(),
           parallel.get_threads(), blas.get_threads())  # the tuner's choice is per thread count
    algo = node.memo.get(key)
    if algo is None:
        algo = node.memo[key] = _choose_algorithm(node, x, w, bias, ctx)
    return algo


def _choose_algorithm(node, x, w, bias, ctx) -> str:
    n, c, h, wd = x.shape
    a = node.attrs
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    macs = n * k * oh * ow * (c // a.groups) * kh * kw
    names = algorithms(node, c, ctx.training, x.dtype)
    if len(names) == 1 or macs < tuner.MIN_MACS or tuner.mode() == "off":
        return names[0]  # decided before any string is built: this runs at every conv call
    # no candidate needs much more memory than the heuristic's own
    limit = max(2 * _workspace_bytes(node, names[0], x), tuner.MAX_WORKSPACE_BYTES)
    names = [names[0]] + [m for m in names[1:] if _workspace_bytes(node, m, x) <= limit]
    problem = (f"conv{KERNELS_VERSION}|{n}x{c}x{h}x{wd}|{x.dtype}|k{k}|{kh}x{kw}|s{sh}x{sw}|d{dh}x{dw}"
               f"|p{'x'.join(map(str, _pads(node)))}|g{a.groups}"
               f"|{'train' if ctx.training else 'infer'}{'+dx' if ctx.training and ctx.need_input_grad else ''}")
    dy = []  # an output gradient to time the backward with, made at the first timing only

    def run(algo):
        y, saved = _forward(node, algo, x, w, bias)
        if ctx.training:
            if not dy:
                dy.append(np.random.default_rng(0).standard_normal(y.shape, dtype=np.float32).astype(y.dtype))
            _backward(node, saved, dy[0], w, bias is not None, ctx.need_input_grad)
    return tuner.choose(problem, names, run, macs)


class ConvEpilogue:
    """A conv's epilogue (bias, residual, activation: celementwise's C pass) handed to its kernel:
    where the gemm is split over the C workers (batch 1), each share runs it on a block of the
    output right after computing it, while the block is in cache (cgemm.matmul's `after`), not in a
    pass of its own over memory; a depthwise conv's C kernel runs it on each plane as it is done
    (cdepthwise.forward). fused_conv hands over its whole epilogue, a plain conv its bias.
    `keep_pre`: the activation's gradient reads its input, which then stays in y (the output is a
    new array). After `done()`, `result` is (output, pre-activation or None)."""

    def __init__(self, bias, residual, act, fast: bool, keep_pre: bool = False):
        self.bias, self.residual, self.act, self.fast, self.keep_pre = bias, residual, act, fast, keep_pre
        self.result = self._pending = None

    def deferred(self, y):
        out = np.empty_like(y) if self.keep_pre else y
        then = celementwise.deferred_epilogue(y, self.bias, self.residual, self.act, out, self.fast)
        self._pending = (out, y if self.keep_pre else None)
        return then

    def done(self):
        self.result = self._pending


def conv_forward(node, xs, params, ctx, after=None):
    """The conv (kernels.py's contract); `after`: an epilogue the conv may run itself (fused.py's
    fused_conv, without a bias here: see _conv), which then says it ran. A bias of the conv's own
    goes to its kernels the same way, where they take one (the split gemm, the depthwise C kernel),
    else it is added after them."""
    (x,) = xs
    n, c = x.shape[:2]
    dtype = x.dtype
    w = params["weight"].astype(dtype, copy=False)
    bias = params["bias"].astype(dtype, copy=False) if "bias" in params else None
    own = ConvEpilogue(bias, None, None, False) if bias is not None and after is None and n else None
    if n and depthwise.is_depthwise(node, c):
        y = depthwise.forward(node, x, w, after if bias is None else own)
        if own is not None and own.result is not None:
            y = own.result[0]
        elif bias is not None:
            y += bias.reshape(1, -1, 1, 1)
        return y, ("depthwise", x)
    algo = _algorithm(node, x, w, bias, ctx) if n else "im2col"
    if own is None or algo != "im2col":
        return _forward(node, algo, x, w, bias, after if bias is None else None)
    y, saved = _forward(node, algo, x, w, None, own)
    if own.result is None:  # the split gemm did not run it
        y += bias.reshape(1, -1, 1, 1)
    return y, saved


def _forward(node, algo: str, x, w, bias, after=None):
    if algo == "direct" and direct.available():
        try:
            return _direct_forward(node, x, w, bias)
        except direct.BuildError as e:  # no working C compiler after all: the NumPy algorithms
            direct.give_up(e)
    if algo == "direct":
        algo = "im2col"
    if algo != "im2col":
        return _shifted_forward(node, x, w, bias, algo)
    n, c = x.shape[:2]
    dtype = x.dtype
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    groups = node.attrs.groups
    if _covers_input(node, x.shape):  # one column an image, the input itself: one gemm for the batch
        y = np.matmul(x.reshape(n, -1), w.reshape(k, -1).T).reshape(n, k, 1, 1)
        if bias is not None:
            y += bias.reshape(1, k, 1, 1)
        return y, ("whole", x)
    y = np.empty((n, k, oh, ow), dtype=dtype)
    work = n * k * oh * ow * (c // groups) * kh * kw
    if n < parallel.get_threads() and k // groups > 1 and work >= parallel.MIN_WORK:
        slices = [(0, n)]  # too few images to share out: the threads share the filters instead
        cols = [_conv(x, w, groups, top, left, hp, wp, sh, sw, dh, dw, y, split_filters=True, after=after)]
    else:
        slices = parallel.chunks(n, work)
        # the epilogue on each image right after its gemm, while the image's output is in cache,
        # not in a pass of its own over the whole batch's output from memory
        then = after.deferred(y) if after is not None and n else None
        per = k * oh * ow

        def part(lo, hi):
            each = None if then is None else \
                lambda i: then.task(cthreads.address(then.args), (lo + i) * per, (lo + i + 1) * per)
            return _conv(x[lo:hi], w, groups, top, left, hp, wp, sh, sw, dh, dw, y[lo:hi], each=each)

        cols = parallel.run(part, slices)
        if then is not None:
            after.done()
    if bias is not None:
        y += bias.reshape(1, k, 1, 1)
    return y, (x if cols[0] is None else None, cols, slices, x.shape)


def conv_backward(node, saved, dy, params, ctx):
    weight = params["weight"].astype(dy.dtype, copy=False)
    if isinstance(saved[0], str) and saved[0] == "depthwise":
        dx, dweight = depthwise.backward(node, saved[1], dy, weight, ctx.need_input_grad)
        dparams = {"weight": dweight}
        if "bias" in params:
            dparams["bias"] = celementwise.channel_sums(dy)
        return [dx], dparams
    return _backward(node, saved, dy, weight, "bias" in params, ctx.need_input_grad)


def _direct_forward(node, x, weight, bias):
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    packed = direct.pack(x, k, kh, kw, (oh, ow), (sh, sw), top, left)
    y = direct.conv(packed, weight)
    if bias is not None:
        y += bias.reshape(1, k, 1, 1)
    return y, ("direct", packed, x.shape)


def _direct_backward(node, saved, dy, weight, has_bias: bool, need_dx: bool):
    """dW and dx by the compiled kernels (direct.grad_weight, direct.grad_input)."""
    _, packed, (n, c, h, w) = saved
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    dy = np.ascontiguousarray(dy)
    dparams = {"weight": direct.grad_weight(packed, dy, kh, kw)}
    if has_bias:
        dparams["bias"] = celementwise.channel_sums(dy)
    dx = direct.grad_input(dy, weight, (h, w), (sh, sw), top, left) if need_dx else None
    return [dx], dparams


def _backward(node, saved, dy, weight, has_bias: bool, need_dx: bool):
    if isinstance(saved[0], str) and saved[0] == "direct":
        return _direct_backward(node, saved, dy, weight, has_bias, need_dx)
    if isinstance(saved[0], str) and saved[0] == "whole":  # _covers_input: the dense layer's gemms
        x = saved[1]
        n, k = dy.shape[:2]
        dyk = np.ascontiguousarray(dy).reshape(n, k)
        dparams = {"weight": np.matmul(dyk.T, x.reshape(n, -1)).reshape(weight.shape)}
        if has_bias:
            dparams["bias"] = dyk.sum(axis=0)
        return [np.matmul(dyk, weight.reshape(k, -1)).reshape(x.shape) if need_dx else None], dparams
    if isinstance(saved[0], str):  # ("shifted", ...)
        return _shifted_backward(node, saved, np.ascontiguousarray(dy), weight, has_bias, need_dx)
    x, cols, slices, (n, c, h, w) = saved
    dtype = dy.dtype
    g = node.attrs.groups
    kh, kw, sh, sw, dh, dw, k, oh, ow, hp, wp = _conv_geometry(node)
    top, _, left, _ = _pads(node)
    kg, cg = k // g, c // g
    dy = np.ascontiguousarray(dy)
    wm = weight.reshape(g, kg, cg * kh * kw)
    dx = np.empty((n, c, h, w), dtype=dtype)
    pointwise = _is_pointwise(kh, kw, sh, sw, top, left, hp, wp, h, w)
    # the transposed conv reads K·kh·kw·H·W elements; col2im's columns and adds cost ~4·C·kh·kw·P
    transposed = not pointwise and sh == sw == 1 and kg <= cg * 2
    if transposed:
        # dx of a stride-1 conv = dy correlated with the spatially flipped kernel, in/out channels
        # swapped; dy is padded by the effective kernel less one, less the forward's padding
        ekh, ekw = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        wf = weight.reshape(g, kg, cg, kh, kw)[:, :, :, ::-1, ::-1].transpose(0, 2, 1, 3, 4)
        wf = np.ascontiguousarray(wf).reshape(g * cg, kg, kh, kw)

    cols_of = dict(zip(slices, cols))
    wm_taps = np.ascontiguousarray(weight.reshape(g, kg, cg, kh, kw).transpose(0, 1, 3, 4, 2)).reshape(g, kg, -1)

    def part(lo, hi):
        dyg = dy[lo:hi].reshape(hi - lo, g, kg, oh * ow)
        colsi = cols_of[lo, hi]
        if colsi is None:  # pointwise: the input is its own column matrix
            colsi = np.ascontiguousarray(x[lo:hi]).reshape(hi - lo, g, cg, h * w)
        m, p, crs = hi - lo, oh * ow, cg * kh * kw
        if kg * crs > p * (kg + crs):  # few output positions (LeNet's C5): one gemm over the batch
            dw_part = np.matmul(dyg.transpose(1, 2, 0, 3).reshape(g, kg, m * p),
                                colsi.transpose(1, 0, 3, 2).reshape(g, m * p, crs))
        else:  # Σ_n dy[n]·cols[n]ᵀ per group, one gemm per image
            dw_part = np.matmul(dyg, colsi.transpose(0, 1, 3, 2)).sum(axis=0)
        if not need_dx:
            pass
        elif pointwise:
            np.matmul(wm.transpose(0, 2, 1), dyg, out=dx[lo:hi].reshape(hi - lo, g, cg, h * w))
        elif transposed:
            _conv(dy[lo:hi], wf, g, ekh - 1 - top, ekw - 1 - left, h + ekh - 1, w + ekw - 1, 1, 1, dh, dw,
                  dx[lo:hi])
        else:
            # rows in tap-major order, so that each kernel offset's slab is contiguous per image
            dcols = np.matmul(wm_taps.transpose(0, 2, 1), dyg).reshape(hi - lo, g, kh, kw, cg, oh, ow)
            dxp = np.zeros((hi - lo, c, hp, wp), dtype=dtype)
            dxp5 = dxp.reshape(hi - lo, g, cg, hp, wp)
            for a in range(kh):  # col2im: each kernel offset adds one strided slice
                for b in range(kw):
                    r, q = a * dh, b * dw
                    dxp5[:, :, :, r:r + (oh - 1) * sh + 1:sh, q:q + (ow - 1) * sw + 1:sw] += dcols[:, :, a, b]
            dx[lo:hi] = _unpad(dxp, top, left, h, w)
        return dw_part

    dw_parts = parallel.run(part, slices)
    dparams = {"weight": sum(dw_parts[1:], dw_parts[0]).reshape(weight.shape)}
    if has_bias:
        dparams["bias"] = celementwise.channel_sums(dy)
    return [dx if need_dx else None], dparams


# ---- pools ---------------------------------------------------------------------------------

def _pool_geometry(node):
    a = node.attrs
    kh, kw = a.kernel
    sh, sw = a.stride or a.kernel
    c, oh, ow = node.out_shape
    return kh, kw, sh, sw, oh, ow, (oh - 1) * sh + kh, (ow - 1) * sw + kw


# a block of planes' padded copy and row-maximum workspace (max pool) stays in cache
POOL_BLOCK_BYTES = 1 << 19


def _plane_blocks(lo: int, hi: int, plane_bytes: int):
    step = max(1, POOL_BLOCK_BYTES // plane_bytes)
    for b0 in range(lo, hi, step):
        yield b0, min(b0 + step, hi)


class _PaddedPlanes:
    """Blocks of x's (image, channel) planes on the padded grid, each block copied into a reused
    workspace whose border was filled once (the same positions are written every block), so no
    padded copy of the whole input is made."""

    def __init__(self, x: np.ndarray, top: int, left: int, hp: int, wp: int, fill: float):
        n, c, h, w = x.shape
        self.planes = x.reshape(n * c, h, w)
        self.place = _placement(h, w, top, left, hp, wp)
        self.shape, self.fill = (hp, wp), fill
        self.whole = (top, left, hp, wp) == (0, 0, h, w)  # no padding: the planes themselves
        gr, gc, xr, xc = self.place
        self.covers = (xr.stop - xr.start, xc.stop - xc.start) == (h, w)  # every input pixel lands

    def workspace(self, rows: int):
        return None if self.whole else np.full((rows, *self.shape), self.fill, dtype=self.planes.dtype)

    def block(self, ws, b0: int, b1: int) -> np.ndarray:
        if self.whole:
            return self.planes[b0:b1]
        gr, gc, xr, xc = self.place
        out = ws[:b1 - b0]
        out[:, gr, gc] = self.planes[b0:b1, xr, xc]
        return out


def maxpool_forward(node, xs, params, ctx):
    """In C where cpool is available (one pass); else separable: the maximum over each window's
    columns, then over its rows (kh + kw − 2 passes instead of kh·kw − 1; max is exact, so the
    result is the windows' maximum to the bit), in blocks of (image, channel) planes padded in a
    workspace and split over the threads."""
    (x,) = xs
    n, c = x.shape[:2]
    kh, kw, sh, sw, oh, ow, hp, wp = _pool_geometry(node)
    top, _, left, _ = _pads(node)
    y = cpool.maxpool_forward(x, (kh, kw), (sh, sw), top, left, (oh, ow)) if cpool.available(x.dtype) else None
    if y is not None:  # one pass in C
        return y, (x, y)
    padded = _PaddedPlanes(x, top, left, hp, wp, -np.inf)  # −inf: padding and ceil overhang never win
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    dst = y.reshape(n * c, oh, ow)
    cols = [slice(j, j + (ow - 1) * sw + 1, sw) for j in range(kw)]
    rows = [slice(i, i + (oh - 1) * sh + 1, sh) for i in range(kh)]

    def part(lo, hi):
        ws = r = None
        for b0, b1 in _plane_blocks(lo, hi, hp * wp * x.itemsize):
            if r is None:
                ws, r = padded.workspace(b1 - b0), np.empty((b1 - b0, hp, ow), dtype=x.dtype)
            blk, m, out = padded.block(ws, b0, b1), r[:b1 - b0], dst[b0:b1]
            np.copyto(m, blk[:, :, cols[0]])
            for cj in cols[1:]:
                np.maximum(m, blk[:, :, cj], out=m)
            np.copyto(out, m[:, rows[0]])
            for ri in rows[1:]:
                np.maximum(out, m[:, ri], out=out)

    parallel.run(part, parallel.chunks(n * c, parallel.WORK_PER_ELEMENT * x.size))
    # no argmax here: masked writes are slow in NumPy, and evaluation never needs it
    return y, (x, y)


def maxpool_backward(node, saved, dy, params, ctx):
    """Each window's gradient goes to its first maximum in row-major order (PyTorch's ties), found
    by comparing every offset's input with the output; block by block as the forward."""
    x, y = saved
    n, c, h, w = x.shape
    kh, kw, sh, sw, oh, ow, hp, wp = _pool_geometry(node)
    top, _, left, _ = _pads(node)
    padded = _PaddedPlanes(x, top, left, hp, wp, -np.inf)
    gr, gc, xr, xc = padded.place
    ys, dys = y.reshape(n * c, oh, ow), np.ascontiguousarray(dy).reshape(n * c, oh, ow)
    dx = (np.empty if padded.covers else np.zeros)((n, c, h, w), dtype=dy.dtype)
    dst = dx.reshape(n * c, h, w)

    def part(lo, hi):
        ws = None
        for b0, b1 in _plane_blocks(lo, hi, hp * wp * dy.itemsize):
            shape = (b1 - b0, oh, ow)
            if ws is None:
                ws, grad = padded.workspace(b1 - b0), np.empty((b1 - b0, hp, wp), dtype=dy.dtype)
                hit, share = np.empty(shape, dtype=bool), np.empty(shape, dtype=dy.dtype)
            src, g = padded.block(ws, b0, b1), grad[:b1 - b0]
            g[...] = 0.0
            open_ = np.ones(shape, dtype=bool)  # windows whose maximum has not been found yet
            h_, s_ = hit[:b1 - b0], share[:b1 - b0]
            for i in range(kh):
                for j in range(kw):  # row-major offsets: ties go to the first maximum, as in PyTorch
                    win = (slice(None), slice(i, i + (oh - 1) * sh + 1, sh), slice(j, j + (ow - 1) * sw + 1, sw))
                    np.equal(src[win], ys[b0:b1], out=h_)
                    h_ &= open_
                    open_ ^= h_
                    np.multiply(dys[b0:b1], h_, out=s_)
                    g[win] += s_
            dst[b0:b1, xr, xc] = g[:, gr, gc]

    parallel.run(part, parallel.chunks(n * c, parallel.WORK_PER_ELEMENT * kh * kw * dy.size))
    return [dx], {}


def _avg_divisor(node, h: int, w: int, dtype) -> np.ndarray:
    """(oh, ow) divisors, PyTorch's rules: with count_pad the window clipped to input + padding
    (never the ceil overhang), without it the window clipped to the input. Cached (read-only):
    building them took 15-25 us a call, a third of LeNet-5's pools."""
    kh, kw, sh, sw, oh, ow, _, _ = _pool_geometry(node)
    return _divisor((kh, kw, sh, sw, oh, ow), _pads(node), bool(node.attrs.count_pad), h, w, np.dtype(dtype).char)


@lru_cache(maxsize=256)
def _divisor(geometry, pads, count_pad: bool, h: int, w: int, char: str) -> np.ndarray:
    kh, kw, sh, sw, oh, ow = geometry
    top, bottom, left, right = pads

    def sizes(out, k, s, p0, p1, n):
        start = np.arange(out) * s - p0
        end = np.minimum(start + k, n + p1)
        if not count_pad:
            start, end = np.maximum(start, 0), np.minimum(end, n)
        return end - start

    div = np.outer(sizes(oh, kh, sh, top, bottom, h), sizes(ow, kw, sw, left, right, w)).astype(char)
    div.flags.writeable = False
    return div


def avgpool_forward(node, xs, params, ctx):
    (x,) = xs
    n, c, h, w = x.shape
    kh, kw, sh, sw, oh, ow, hp, wp = _pool_geometry(node)
    top, _, left, _ = _pads(node)
    div = _avg_divisor(node, h, w, x.dtype)
    y = cpool.avgpool_forward(x, div, (kh, kw), (sh, sw), top, left, (oh, ow)) if cpool.available(x.dtype) else None
    if y is not None:  # one pass in C
        return y, x.shape
    xp = _pad(x, top, left, hp, wp)
    y = _window(xp, 0, 0, oh, ow, sh, sw).copy()
    for i in range(kh):
        for j in range(kw):
            if i or j:
                y += _window(xp, i, j, oh, ow, sh, sw)
    y /= div
    return y, x.shape


def avgpool_backward(node, saved, dy, params, ctx):
    n, c, h, w = saved
    kh, kw, sh, sw, oh, ow, hp, wp = _pool_geometry(node)
    top, _, left, _ = _pads(node)
    div = _avg_divisor(node, h, w, dy.dtype)
    dx = cpool.avgpool_backward(dy, div, (kh, kw), (sh, sw), top, left, saved) if cpool.available(dy.dtype) else None
    if dx is not None:
        return [dx], {}
    g = dy / div
    dxp = np.zeros((n, c, hp, wp), dtype=dy.dtype)
    for i in range(kh):
        for j in range(kw):
            _window(dxp, i, j, oh, ow, sh, sw)[...] += g
    return [_unpad(dxp, top, left, h, w)], {}


def globalavgpool_forward(node, xs, params, ctx):
    """Each map's mean: its sum in C on the threads (celementwise.map_sums) ÷ its size, else
    NumPy's mean (the two differ in rounding only). EfficientNet-B0's squeeze-excitation pools
    over 32-1152 channels at batch 1, where NumPy's mean ran on one thread."""
    (x,) = xs
    n, c, h, w = x.shape
    sums = celementwise.map_sums(x) if x.size else None
    if sums is not None:
        return np.divide(sums, h * w, out=sums).reshape(n, c, 1, 1), x.shape
    return x.mean(axis=(2, 3), keepdims=True), x.shape


def globalavgpool_backward(node, saved, dy, params, ctx):
    n, c, h, w = saved
    dx = np.empty(saved, dtype=dy.dtype)
    dx[...] = dy * (1.0 / (h * w))
    return [dx], {}


def _adaptive_matrix(n: int, out: int, dtype) -> np.ndarray:
    """(out, n) averaging matrix of PyTorch's windows [floor(i·n/out), ceil((i+1)·n/out))."""
    m = np.zeros((out, n), dtype=dtype)
    for i in range(out):  # out is tiny
        start, end = (i * n) // out, -(-((i + 1) * n) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avgpool_forward(node, xs, params, ctx):
    (x,) = xs
    n, c, h, w = x.shape
    _, oh, ow = node.out_shape
    if h % oh == 0 and w % ow == 0:  # equal windows: a reshape and a mean
        y = x.reshape(n, c, oh, h // oh, ow, w // ow).mean(axis=(3, 5))
        return y, (x.shape, None, None)
    # the windows' average is separable: rows then columns, Ah · x · Awᵀ
    ah, aw = _adaptive_matrix(h, oh, x.dtype), _adaptive_matrix(w, ow, x.dtype)
    return np.matmul(np.matmul(ah, x), aw.T), (x.shape, ah, aw)


def adaptive_avgpool_backward(node, saved, dy, params, ctx):
    (n, c, h, w), ah, aw = saved
    _, oh, ow = node.out_shape
    if ah is None:
        fh, fw = h // oh, w // ow
        dx = np.empty((n, c, oh, fh, ow, fw), dtype=dy.dtype)
        dx[...] = (dy * (1.0 / (fh * fw)))[:, :, :, None, :, None]
        return [dx.reshape(n, c, h, w)], {}
    return [np.matmul(np.matmul(ah.T.astype(dy.dtype, copy=False), dy), aw.astype(dy.dtype, copy=False))], {}
