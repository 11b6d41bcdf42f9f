"""Fused kernels of the NumPy backend: the ops the compiler's fusion passes create.

    fused_conv        conv (+ bias) (+ residual input) (+ activation), one epilogue pass
    fused_dense       dense (+ bias) (+ activation)
    elemwise_chain    unary element-wise ops applied in order, in one pass
    layout_transform  NCHW ↔ NHWC memory order (the logical shape stays C×H×W)

The convolution and the matrix product are the unfused kernels' own (`conv.py`, `kernels.py`);
what fusion buys here is the epilogue. The bias, the residual and the activation run in place
on the freshly computed output, block by block (`_BLOCK` elements: a block stays in the cache
from its first op to its last, and block-sized temporaries are all an activation needs),
split over the worker threads: 1.3–2.5× faster than the unfused kernels' bias add, add and
relu at ResNet-50 sizes (2 cores, float32). The forward's values are the unfused composition's
exactly (each op computes the same expression in the same order).

What backward keeps is what the op table's `grad_needs` promises: the fused conv and dense
keep their input (the conv's own saved columns) and output, since every activation's
gradient follows from its output (relu: y > 0, relu6: 0 < y < 6, leaky_relu: y > 0 for a
slope ≥ 0, sigmoid: y(1 − y), tanh: 1 − y²); only a leaky_relu of negative slope, whose
output hides the input's sign, keeps a boolean mask besides. The element-wise chain keeps
only its input and recomputes the intermediate values in backward: each op's Jacobian is
diagonal, so the chain rule's product of derivatives can be taken in forward order, next to
the recomputation, with two block-sized buffers and no full-size array but the gradient.

Speed notes (NumPy 2, float32): `np.clip(y, 0, inf)` is ~4× faster than `np.maximum(y, 0)`
(the scalar form of maximum is not vectorised), and masked selections (`np.where`,
`copyto(where=)`) are ~10× slower than arithmetic with a 0/1 mask, so leaky_relu's forward is
max(x, s·x) and its gradient dy·(m·(1 − s) + s), both exactly the unfused values.
"""

from __future__ import annotations

import numpy as np

from cnnc.dsl.errors import CnncError

from . import conv as _conv
from . import kernels as _kernels  # circular (kernels registers these): read at call time only
from . import parallel

# elements per block of the epilogue loops (float32: 1 MiB an array): blocks stay in the cache
# between ops; much smaller ones lose more to NumPy's per-call overhead (~3 µs) than they gain
_BLOCK = 1 << 18
_WORK_PER_ELEMENT = 8  # parallel.chunks' work units per element: threads from ~512K elements


def _ranges(size: int, fn, unit: int = 1) -> None:
    """fn(a, b) over [0, size) in blocks of about _BLOCK elements (multiples of `unit`), the
    blocks split over the worker threads."""
    units = size // unit
    step = max(1, _BLOCK // unit)

    def part(lo, hi):
        for i in range(lo, hi, step):
            fn(i * unit, min(i + step, hi) * unit)

    if units:
        parallel.run(part, parallel.chunks(units, _WORK_PER_ELEMENT * size))


def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array."""
    return a.reshape(-1)


# ---- unary element-wise ops on blocks --------------------------------------------------------

def _apply(op: str, slope: float, src: np.ndarray, out: np.ndarray) -> None:
    """out = op(src); `out` may be `src` (in place)."""
    if op == "relu":
        np.clip(src, 0, np.inf, out=out)
    elif op == "relu6":
        np.clip(src, 0, 6, out=out)
    elif op == "leaky_relu":
        # max(x, s·x) for s ≤ 1 (negative slopes too), min(x, s·x) for s > 1: exactly the
        # unfused where(x > 0, x, s·x), without its slow masked selection
        pick = np.maximum if slope <= 1 else np.minimum
        if src is out:
            pick(src, src * slope, out=out)
        else:
            np.multiply(src, slope, out=out)
            pick(src, out, out=out)
    elif op == "sigmoid":  # ½(1 + tanh(x/2)), as the unfused kernel
        np.multiply(src, 0.5, out=out)
        np.tanh(out, out=out)
        out += 1
        out *= 0.5
    elif op == "tanh":
        np.tanh(src, out=out)
    elif op != "none":
        raise CnncError(f"unknown activation `{op}`")


def _grad(op: str, slope: float, v: np.ndarray, g: np.ndarray, out: np.ndarray,
          positive: np.ndarray | None = None) -> None:
    """out = op'·g, `out` may be `g`. `v` is the op's input or its output for relu, relu6 and
    leaky_relu (slope ≥ 0; otherwise `positive` gives input > 0), its output for sigmoid and tanh."""
    if op == "relu":
        np.multiply(g, v > 0, out=out)
    elif op == "relu6":  # zero at the kinks 0 and 6 too, as PyTorch's hardtanh
        m = v > 0
        np.logical_and(m, v < 6, out=m)
        np.multiply(g, m, out=out)
    elif op == "leaky_relu":
        m = v > 0 if positive is None else positive
        s = out.dtype.type(slope)
        # m·(1 − s) + s is exactly 1 or s (for 0 ≤ s ≤ 1; within an ulp otherwise), then · g
        if out is g:
            g *= m * (out.dtype.type(1) - s) + s
        else:
            np.multiply(m, out.dtype.type(1) - s, out=out)
            out += s
            out *= g
    elif op == "sigmoid":  # g·y·(1 − y), the unfused kernel's order
        t = 1 - v
        np.multiply(g, v, out=out)
        out *= t
    elif op == "tanh":  # g·(1 − y²)
        t = v * v
        np.subtract(1, t, out=t)
        np.multiply(g, t, out=out)
    elif op == "none":
        if out is not g:
            out[...] = g
    else:
        raise CnncError(f"unknown activation `{op}`")


def _needs_output(act: str) -> bool:
    return act != "none"


def _needs_mask(act: str, slope: float) -> bool:
    return act == "leaky_relu" and slope < 0  # y > 0 for either sign of the input


# ---- the shared epilogue ---------------------------------------------------------------------

def _epilogue(y: np.ndarray, bias, residual, act: str, slope: float):
    """In place on y (N, K, …), C-contiguous: y += bias (along axis 1), y += residual,
    y = act(y), block by block. Returns the input-positive mask where backward needs one."""
    if (bias is None and residual is None and act == "none") or y.size == 0:
        return None
    n, k = y.shape[:2]
    inner = y.size // max(n * k, 1)  # elements per (batch item, channel) row
    yf = _flat(y)
    rf = None if residual is None else _flat(np.ascontiguousarray(residual, dtype=y.dtype))
    brows = None if bias is None else np.tile(bias.astype(y.dtype, copy=False), n)[:, None]
    mask = np.empty(y.shape, dtype=bool) if _needs_mask(act, slope) else None
    mf = None if mask is None else _flat(mask)

    def block(a, b):
        yb = yf[a:b]
        if brows is not None:
            yb.reshape(-1, inner)[...] += brows[a // inner:b // inner]
        if rf is not None:
            yb += rf[a:b]
        if mf is not None:
            np.greater(yb, 0, out=mf[a:b])
        _apply(act, slope, yb, yb)

    _ranges(y.size, block, unit=inner)
    return mask


def _epilogue_grad(act: str, slope: float, y, mask, dy: np.ndarray) -> np.ndarray:
    """act'·dy as a new array (dy itself when there is no activation)."""
    if act == "none":
        return dy
    dy = np.ascontiguousarray(dy)
    dz = np.empty(dy.shape, dtype=dy.dtype)
    yf, gf, zf = _flat(y), _flat(dy), _flat(dz)
    mf = None if mask is None else _flat(mask)

    def block(a, b):
        _grad(act, slope, yf[a:b], gf[a:b], zf[a:b], None if mf is None else mf[a:b])

    _ranges(dz.size, block)
    return dz


# ---- fused_conv ----------------------------------------------------------------------------

def fused_conv_forward(node, xs, params, ctx):
    a = node.attrs
    x = xs[0]
    # the conv without its bias: the epilogue adds it in the same pass as the rest
    y, conv_saved = _conv.conv_forward(node, [x], {"weight": params["weight"]}, ctx)
    mask = _epilogue(y, params.get("bias"), xs[1] if a.residual else None, a.activation, a.slope)
    return y, (conv_saved, y if _needs_output(a.activation) else None, mask)


def fused_conv_backward(node, saved, dy, params, ctx):
    a = node.attrs
    conv_saved, y, mask = saved
    dz = _epilogue_grad(a.activation, a.slope, y, mask, dy)
    (dx,), dparams = _conv.conv_backward(node, conv_saved, dz, params, ctx)  # bias: Σ dz
    return ([dx, dz] if a.residual else [dx]), dparams


# ---- fused_dense ---------------------------------------------------------------------------

def fused_dense_forward(node, xs, params, ctx):
    a = node.attrs
    y, dense_saved = _kernels.dense_forward(node, xs, params, ctx)  # (N, units), bias added
    mask = _epilogue(y, None, None, a.activation, a.slope)
    return y, (dense_saved, y if _needs_output(a.activation) else None, mask)


def fused_dense_backward(node, saved, dy, params, ctx):
    a = node.attrs
    dense_saved, y, mask = saved
    dz = _epilogue_grad(a.activation, a.slope, y, mask, dy)
    return _kernels.dense_backward(node, dense_saved, dz, params, ctx)


# ---- elemwise_chain ------------------------------------------------------------------------

def chain_forward(node, xs, params, ctx):
    (x,) = xs
    ops = node.attrs.steps(node.name)
    if not ops:
        return x, None
    x = np.ascontiguousarray(x)
    y = np.empty(x.shape, dtype=x.dtype)
    xf, yf = _flat(x), _flat(y)

    def block(a, b):
        src, out = xf[a:b], yf[a:b]
        for op, slope in ops:
            _apply(op, slope, src, out)
            src = out

    _ranges(y.size, block)
    return y, x


def chain_backward(node, saved, dy, params, ctx):
    ops = node.attrs.steps(node.name)
    if not ops:
        return [dy], {}
    x = saved
    dy = np.ascontiguousarray(dy)
    dx = np.empty(dy.shape, dtype=dy.dtype)
    xf, gf, df = _flat(x), _flat(dy), _flat(dx)
    last = len(ops) - 1

    def block(a, b):
        z, g, out = xf[a:b], gf[a:b], df[a:b]
        work = None  # the recomputed value: a block-sized buffer, in place op after op
        for i, (op, slope) in enumerate(ops):
            if op in ("sigmoid", "tanh"):  # the derivative from the op's output
                if work is None:
                    work = np.empty_like(z)
                _apply(op, slope, z, work)
                z = work
                _grad(op, slope, z, g, out)
            else:  # relu, relu6, leaky_relu: from the op's input
                _grad(op, slope, z, g, out)
                if i < last:
                    if work is None:
                        work = np.empty_like(z)
                    _apply(op, slope, z, work)
                    z = work
            g = out

    _ranges(dx.size, block)
    return [dx], {}


# ---- layout_transform ----------------------------------------------------------------------

# source rows a tile of the 2-D transposes moves (their columns all at once); with the threads,
# 1.8× (NCHW → NHWC) and 3.3× (NHWC → NCHW) faster than np.ascontiguousarray at 8×256×56×56
_TILE_ROWS = 256


def _swap_last(x: np.ndarray, a: int, b: int) -> np.ndarray:
    """x viewed as (N, a, b) → a new C-contiguous (N, b, a), in row tiles over the threads."""
    n = x.shape[0]
    src = x.reshape(n, a, b)
    out = np.empty((n, b, a), dtype=x.dtype)
    # tiles of source rows keep the destination's column runs short, in the cache (2× faster
    # for H·W×C → C×H·W); for narrow rows (b < 16) NumPy's own copy of the whole image is faster
    step = a if b < 16 else _TILE_ROWS
    tiles = [(i, r, min(r + step, a)) for i in range(n) for r in range(0, a, step)]

    def part(lo, hi):
        for i, r0, r1 in tiles[lo:hi]:
            out[i, :, r0:r1] = src[i, r0:r1].T

    parallel.run(part, parallel.chunks(len(tiles), _WORK_PER_ELEMENT * x.size))
    return out


def _to_layout(x: np.ndarray, to: str) -> np.ndarray:
    """NCHW (N, C, H, W) → NHWC (N, H, W, C), or back, as a new C-contiguous array."""
    if x.ndim != 4:
        raise CnncError(f"layout_transform needs a 4-D array, got shape {x.shape}")
    perm = (0, 2, 3, 1) if to == "NHWC" else (0, 3, 1, 2)
    if not x.flags.c_contiguous:  # a view: NumPy copies only if the target order needs it
        return np.ascontiguousarray(x.transpose(perm))
    n, d1, d2, d3 = x.shape
    if to == "NHWC":  # (N, C, H·W) → (N, H·W, C)
        return _swap_last(x, d1, d2 * d3).reshape(n, d2, d3, d1)
    return _swap_last(x, d1 * d2, d3).reshape(n, d3, d1, d2)  # (N, H·W, C) → (N, C, H·W)


def layout_forward(node, xs, params, ctx):
    (x,) = xs
    return _to_layout(x, node.attrs.to), None


def layout_backward(node, saved, dy, params, ctx):
    return [_to_layout(dy, "NCHW" if node.attrs.to == "NHWC" else "NHWC")], {}
