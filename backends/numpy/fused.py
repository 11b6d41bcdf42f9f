"""Fused kernels of the NumPy backend: the ops the compiler's fusion passes create.

    fused_conv        conv (+ bias) (+ residual input) (+ activation), one epilogue pass
    fused_dense       dense (+ bias) (+ activation)
    (fused_bn, BatchNorm + activation, is BatchNorm's kernel in kernels.py with this epilogue)
    elemwise_chain    unary element-wise ops applied in order, in one pass
    layout_transform  NCHW ↔ NHWC memory order (the logical shape stays C×H×W)

The convolution and the matrix product are the unfused kernels' own (`conv.py`, `dense.py`);
what fusion buys here is the epilogue. The bias, the residual and the activation run in place
on the freshly computed output, block by block (`parallel.BLOCK` elements: a block stays in the cache
from its first op to its last, and block-sized temporaries are all an activation needs),
split over the worker threads: 1.3–2.5× faster than the unfused kernels' bias add, add and
relu at ResNet-50 sizes (2 cores, float32). The forward's values are the unfused composition's
exactly (each op computes the same expression in the same order).

What backward keeps is what the activation's formula reads (compiler/formula.py): the
output when its derivative is written in y (relu, relu6, sigmoid, tanh, hardsigmoid), or the
pre-activation z when it needs the input (leaky_relu of any slope, hardswish, silu, gelu, elu:
their output does not tell the slope), which the epilogue then keeps in the conv's own output
buffer and writes the activation to a new one. The element-wise chain keeps only its input and
recomputes the intermediate values in backward: each op's Jacobian is diagonal, so the chain
rule's product of derivatives can be taken in forward order, next to the recomputation, with
block-sized temporaries and no full-size array but the gradient. Activations are the op
table's formulas as `elementwise.py` renders them, so fused and unfused values agree exactly.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import CnncError

from . import celementwise as _cew
from . import conv as _conv
from . import dense as _dense
from . import elementwise as _ew
from . import parallel

def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array."""
    return a.reshape(-1)


# ---- the shared epilogue ---------------------------------------------------------------------

def _reads(act) -> frozenset[str]:
    return frozenset() if act is None else _grad_reads(act[0])


@lru_cache(maxsize=None)
def _grad_reads(op: str) -> frozenset[str]:  # walks the formula: cached, it runs at every call
    return OPS[op].formula.grad_reads


def epilogue(y: np.ndarray, bias, residual, act, fast: bool = False):
    """y (N, K, …), C-contiguous: z = y + bias (along axis 1) + residual, in place on y, then the
    activation `act` ((op, args) or None), block by block. Returns (output, pre-activation z where
    the activation's derivative reads its input, else None); the output is y itself unless z is kept.
    `fast` (inference): the C pass may take exp and sigmoid by its own polynomial (celementwise's
    FAST_EXP, float32), within a few ulps of NumPy's values rather than equal to them."""
    if y.size == 0 or (bias is None and residual is None and act is None):
        return y, None
    keep_pre = "input" in _reads(act)
    n, k = y.shape[:2]
    inner = y.size // max(n * k, 1)  # elements per (batch item, channel) row
    yf = _flat(y)
    out = np.empty_like(y) if keep_pre else y
    of = _flat(out)
    done = _cew.epilogue(y, bias, residual, act, out, fast)  # one C pass (celementwise.py), where it has one
    if done == "all":
        return out, (y if keep_pre else None)
    if done == "affine":  # the bias and residual are in y: the activation is NumPy's
        bias = residual = None
    brows = None if bias is None else np.tile(bias.astype(y.dtype, copy=False), n)[:, None]
    rf = None if residual is None else _flat(np.ascontiguousarray(residual, dtype=y.dtype))

    def block(a, b):
        yb = yf[a:b]
        if brows is not None:
            yb.reshape(-1, inner)[...] += brows[a // inner:b // inner]
        if rf is not None:
            yb += rf[a:b]
        if act is not None:
            _ew.apply_into(act[0], act[1], yb, of[a:b])  # of may be yf itself: written in place

    parallel.ranges(y.size, block, unit=inner)
    return out, (y if keep_pre else None)


def epilogue_grad(act, pre, y, dy: np.ndarray) -> np.ndarray:
    """act'·dy as a new array (dy itself when there is no activation), from the kept
    pre-activation and/or output."""
    if act is None:
        return dy
    dy = np.ascontiguousarray(dy)
    dz = np.empty(dy.shape, dtype=dy.dtype)
    if _cew.gradient(act[0], act[1], pre, y, dy, dz):  # one C pass (celementwise.py), where it has one
        return dz
    pf = None if pre is None else _flat(pre)
    yf = None if y is None else _flat(y)
    gf, zf = _flat(dy), _flat(dz)

    def block(a, b):
        _ew.grad_into(act[0], act[1], None if pf is None else pf[a:b], None if yf is None else yf[a:b],
                      gf[a:b], zf[a:b])

    parallel.ranges(dz.size, block)
    return dz


# ---- fused_conv ----------------------------------------------------------------------------

def fused_conv_forward(node, xs, params, ctx):
    a = node.attrs
    act = a.act()
    bias, residual = params.get("bias"), xs[1] if a.residual else None
    # inference's epilogue may take exp and sigmoid by the C pass's own polynomial (FAST_EXP); a
    # training step keeps NumPy's values, so that its fused plan's gradients are the plain one's
    fast = not ctx.training
    after = None if bias is None and residual is None and act is None \
        else _conv.ConvEpilogue(bias, residual, act, fast, "input" in _reads(act))
    # the conv without its bias: the epilogue adds it in the same pass as the rest
    y, conv_saved = _conv.conv_forward(node, [xs[0]], {"weight": params["weight"]}, ctx, after=after)
    if after is not None and after.result is not None:  # the split gemm ran it
        y, pre = after.result
    else:
        y, pre = epilogue(y, bias, residual, act, fast)
    return y, (conv_saved, pre, y if "output" in _reads(act) else None)


def fused_conv_backward(node, saved, dy, params, ctx):
    a = node.attrs
    conv_saved, pre, y = saved
    dz = epilogue_grad(a.act(), pre, y, dy)
    (dx,), dparams = _conv.conv_backward(node, conv_saved, dz, params, ctx)  # bias: Σ dz
    return ([dx, dz] if a.residual else [dx]), dparams


# ---- fused_dense ---------------------------------------------------------------------------

def fused_dense_forward(node, xs, params, ctx):
    act = node.attrs.act()
    y, dense_saved = _dense.dense_forward(node, xs, params, ctx)  # (N, units), bias added
    y, pre = epilogue(y, None, None, act)
    return y, (dense_saved, pre, y if "output" in _reads(act) else None)


def fused_dense_backward(node, saved, dy, params, ctx):
    dense_saved, pre, y = saved
    dz = epilogue_grad(node.attrs.act(), pre, y, dy)
    return _dense.dense_backward(node, dense_saved, dz, params, ctx)


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
        v = xf[a:b]
        for op, args in ops:
            v = _ew.apply(op, args, v)
        yf[a:b] = v

    parallel.ranges(y.size, block)
    return y, x


def chain_backward(node, saved, dy, params, ctx):
    ops = node.attrs.steps(node.name)
    if not ops:
        return [dy], {}
    x = saved
    dy = np.ascontiguousarray(dy)
    dx = np.empty(dy.shape, dtype=dy.dtype)
    xf, gf, df = _flat(x), _flat(dy), _flat(dx)

    def block(a, b):
        # each op's Jacobian is diagonal: the chain rule's product can be taken in forward order,
        # next to the recomputation of each op's input and output
        z, g = xf[a:b], gf[a:b]
        for op, args in ops:
            out = _ew.apply(op, args, z)
            g = _ew.grad(op, args, z, out, g)
            z = out
        df[a:b] = g

    parallel.ranges(dx.size, block)
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

    parallel.run(part, parallel.chunks(len(tiles), parallel.WORK_PER_ELEMENT * x.size))
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
