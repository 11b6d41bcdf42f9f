"""The NumPy backend's kernels: one forward and one backward per op of the op table.

`forward(node, xs, params, ctx) -> (y, saved)` and
`backward(node, saved, dy, params, ctx) -> (dxs, dparams)`, NCHW arrays with the batch first,
PyTorch's semantics. Kernels keep their input's dtype (float32 in training, float64 in the
gradient tests); a backward may return `dy` itself or a view of it, never an array it keeps.
Convolution and pooling live in `conv.py`, dense and flatten in `dense.py`, the fused ops in
`fused.py`, and every op with an element-wise formula runs `elementwise.py`'s `ELEMENTWISE`
pair; this module holds the rest and the `KERNELS` table.
"""

from __future__ import annotations

import numpy as np

from cnnc.backends.base import Kernel

from . import channel_ops as _ch
from . import conv as _conv
from . import dense as _dense
from . import elementwise as _elementwise
from . import fused as _fused
from . import jit, parallel
from .parallel import WORK_PER_ELEMENT

ELEMENTWISE = Kernel(_elementwise.eltwise_forward, _elementwise.eltwise_backward)  # every op with a formula

# dropout when the context brings no generator (evaluation code that forgot one)
_fallback_rng = np.random.default_rng()


# ---- softmax, dropout, identity ---------------------------------------------------------

def softmax_forward(node, xs, params, ctx):
    (x,) = xs
    e = np.exp(x - x.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e, e


def softmax_backward(node, saved, dy, params, ctx):
    y = saved
    return [y * (dy - (dy * y).sum(axis=1, keepdims=True))], {}


def identity_forward(node, xs, params, ctx):
    return xs[0], None


def identity_backward(node, saved, dy, params, ctx):
    return [dy], {}


def dropout_forward(node, xs, params, ctx):
    (x,) = xs
    rate = float(node.attrs.rate)
    if not ctx.training or rate == 0.0:
        return x, None
    rng = getattr(ctx, "rng", None) or _fallback_rng
    # inverted dropout: kept activations scaled by 1/(1−rate), so evaluation is the identity
    mask = (rng.random(x.shape, dtype=np.float32) >= rate).astype(x.dtype)
    mask *= 1.0 / (1.0 - rate)
    return x * mask, mask


def dropout_backward(node, saved, dy, params, ctx):
    return [dy if saved is None else dy * saved], {}


# ---- normalisation -------------------------------------------------------------------------

# Elements per block of BatchNorm's passes: a block and its one temporary stay in the cache between
# the few NumPy calls made on it.
BN_BLOCK = 1 << 18
# Rows from which a batched dot product per row beats a product and a matrix-vector sum (short rows:
# the batched matmul's per-row cost dominates).
BN_DOT_WIDTH = 512


def _bn_rows(a: np.ndarray) -> np.ndarray:
    """(N·C, H·W) rows of an (N, C, H, W) or (N, C) array: one (image, channel) pair a row."""
    n, c = a.shape[:2]
    return np.ascontiguousarray(a).reshape(n * c, -1)


def _row_blocks(rows: int, width: int, fn) -> None:
    """fn(r0, r1) over blocks of whole rows of about BN_BLOCK elements, split over the threads."""
    parallel.ranges(rows * width, lambda a, b: fn(a // width, b // width), unit=width, block=BN_BLOCK)


def _row_dots(a: np.ndarray, b: np.ndarray, ones: np.ndarray, out: np.ndarray) -> None:
    """out[i] = a[i]·b[i] for (rows, width) blocks: a batched dot product a row when rows are long,
    else the product and a matrix-vector sum (for short rows the batched matmul's per-row cost dominates)."""
    if a.shape[1] >= BN_DOT_WIDTH:
        np.matmul(a[:, None, :], b[:, :, None], out=out[:, None, None])
    else:
        np.matmul(a * b, ones, out=out)


def _per_row(v: np.ndarray, n: int, dtype) -> np.ndarray:
    """A per-channel (C,) vector as an (N·C, 1) column matching _bn_rows' rows."""
    return np.tile(np.asarray(v, dtype=dtype), n)[:, None]


def _combine(sums: np.ndarray, m2: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance from per-row sums and centred sums of squares, both
    (N, C), rows of `width` elements (Chan et al.'s pairwise update, in float64)."""
    sums, m2 = sums.astype(np.float64), m2.astype(np.float64)
    count = sums.shape[0] * width
    mean = sums.sum(axis=0) / count
    spread = sums / width - mean
    return mean, (m2.sum(axis=0) + width * (spread * spread).sum(axis=0)) / count


def _global_stats(reduce, mean, var, count):
    """Per-channel mean and biased variance over every rank's batch, from each rank's count, sum and
    sum of squares about zero (float64; activations near unit scale keep the subtraction exact enough)."""
    c = len(mean)
    total = reduce(np.concatenate([[count], count * mean, count * (var + mean * mean)]))
    n = total[0]
    g_mean = total[1:c + 1] / n
    return g_mean, np.maximum(total[c + 1:] / n - g_mean * g_mean, 0.0), int(round(n))


def batchnorm_forward(node, xs, params, ctx):
    """Two passes over x in cache-sized blocks of (image, channel) rows, split over the threads:
    per-row sums and centred sums of squares (combined per channel in float64), then y = x·a + b
    per channel. Backward keeps x itself (the array exists anyway) rather than a new x̂."""
    return _batchnorm_forward(node, xs[0], params, ctx, None)


def fused_bn_forward(node, xs, params, ctx):
    """BatchNorm (+ the residual input) then its activation (fused_bn). With a generated loop for
    the activation (jit.has_bn_loop: relu, relu6, leaky_relu, hardsigmoid, hardswish) the
    normalisation, the residual add and the activation are one pass, y = f(x·a + b + r), and
    backward recomputes the pre-activation from x (and r) instead of keeping it; otherwise the
    residual and the activation run on the normalised output as a fused conv's epilogue does
    (keeping the pre-activation where its derivative reads it). The residual's gradient is the
    activation's, g = dy·f'."""
    residual = xs[1] if node.attrs.residual else None
    return _batchnorm_forward(node, xs[0], params, ctx, node.attrs.act(), residual)


class _BnSaved:
    """What BatchNorm's backward reads: x, the batch's (or running) mean and σ⁻¹, whether the
    statistics were the batch's; for fused_bn also the activation, its output, and either the
    normalisation's per-channel scale and shift and the residual input (the generated loops
    recompute x·a + b + r) or the kept pre-activation (None where the derivative does not read it)."""

    __slots__ = ("x", "mean", "invstd", "training", "act", "y", "scale", "shift", "pre", "res", "fused")

    def __init__(self, x, mean, invstd, training):
        self.x, self.mean, self.invstd, self.training = x, mean, invstd, training
        self.act = self.y = self.scale = self.shift = self.pre = self.res = None
        self.fused = False  # fused_bn: an activation and/or a residual after the normalisation


def _batchnorm_forward(node, x, params, ctx, act, residual=None):
    a = node.attrs
    n, c = x.shape[:2]
    dtype = x.dtype
    rows = _bn_rows(x)
    width = rows.shape[1]
    eps = float(a.eps)
    rm, rv = params["running_mean"], params["running_var"]
    compiled = jit.enabled()
    if ctx.training and compiled:
        mean, var = np.empty(c), np.empty(c)
        jit.run(jit.loops().bn_stats, c, WORK_PER_ELEMENT * x.size, rows.reshape(n, c, width), dtype.type(0),
                np.empty(c, dtype), mean, var)
    elif ctx.training:
        ones = np.ones(width, dtype=dtype)
        sums = np.empty(n * c, dtype=dtype)
        m2 = np.empty(n * c, dtype=dtype)

        def stats(r0, r1):
            xb = rows[r0:r1]
            s = np.matmul(xb, ones, out=sums[r0:r1])
            t = xb - (s * (1.0 / width))[:, None]
            _row_dots(t, t, ones, m2[r0:r1])

        _row_blocks(n * c, width, stats)
        mean, var = _combine(sums.reshape(n, c), m2.reshape(n, c), width)
    if ctx.training:
        count, m = n * width, float(a.momentum)
        if ctx.bn_reduce is not None:  # the global batch's statistics (sync_bn)
            mean, var, count = _global_stats(ctx.bn_reduce, mean, var, count)
        rm *= 1.0 - m  # in place: the buffers are the executor's arrays
        rm += m * mean
        rv *= 1.0 - m
        rv += (m * count / max(count - 1, 1)) * var  # unbiased, as PyTorch stores it
    else:
        mean, var = rm.astype(np.float64), rv.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd * params["weight"] if a.affine else invstd
    shift = (params["bias"] - mean * scale) if a.affine else -mean * scale
    y = np.empty(x.shape, dtype=dtype)
    saved = _BnSaved(x, mean, invstd, bool(ctx.training))
    saved.fused = act is not None or residual is not None
    shape3 = (n, c, width)
    if residual is not None:
        residual = np.ascontiguousarray(residual, dtype=dtype)
    if compiled and act is not None and jit.has_bn_loop(act[0]) and dtype in (np.float32, np.float64):
        saved.act, saved.y, saved.res = act, y, residual
        saved.scale, saved.shift = scale.astype(dtype), shift.astype(dtype)
        forward = getattr(jit.bn_module(act[0]), f"forward_{dtype.name}")
        res, mode = (rows, 0) if residual is None else (_bn_rows(residual), 1)
        jit.run(forward, n * c, WORK_PER_ELEMENT * x.size, rows.reshape(shape3), saved.scale, saved.shift,
                y.reshape(shape3), res.reshape(shape3), mode, *map(dtype.type, act[1]))
        return y, saved
    if compiled:
        jit.run(jit.loops().bn_apply, n * c, WORK_PER_ELEMENT * x.size, rows.reshape(shape3), scale.astype(dtype),
                shift.astype(dtype), y.reshape(shape3))
    else:
        yrows, sr, br = y.reshape(n * c, width), _per_row(scale, n, dtype), _per_row(shift, n, dtype)

        def normalise(r0, r1):
            yb = yrows[r0:r1]
            np.multiply(rows[r0:r1], sr[r0:r1], out=yb)
            yb += br[r0:r1]

        _row_blocks(n * c, width, normalise)
    if not saved.fused:
        return y, saved
    saved.act = act
    saved.y, saved.pre = _fused.epilogue(y, None, residual, act)
    return saved.y, saved


def batchnorm_backward(node, saved, dy, params, ctx):
    """dβ = Σ dy and dγ = Σ dy·x̂ in one blocked pass over dy and x (per-row sums and dot products),
    then, in training (through the batch statistics), dx = γσ⁻¹·(dy − mean(dy) − x̂·mean(dy·x̂))
    in another, as k·dy + b·x + c with per-channel k, b, c: three NumPy calls a block. After an
    activation (fused_bn) its gradient g = dy·f' takes dy's place: with the generated loops, g is
    written into dx's array a row at a time and summed while the row is in the cache, and the last
    pass turns it into dx in place."""
    x, mean, invstd, training = saved.x, saved.mean, saved.invstd, saved.training
    a = node.attrs
    n, c = dy.shape[:2]
    dtype = dy.dtype
    rows = _bn_rows(x)
    width = rows.shape[1]
    shape3 = (n, c, width)
    compiled = jit.enabled()
    dx = np.empty(dy.shape, dtype=dtype)
    looped = saved.act is not None and saved.scale is not None  # fused_bn_forward's generated loops
    if saved.fused and not looped:
        dy = _fused.epilogue_grad(saved.act, saved.pre, saved.y, dy)
    # with a residual, g = dy·f' is also the residual's gradient: its own array, not dx's
    g = None if not looped else dx if saved.res is None else np.empty(dy.shape, dtype=dtype)
    grows = g.reshape(n * c, width) if looped else _bn_rows(dy)
    if looped:  # g = dy·f', Σ g and Σ g·(x − μ)
        db, dxc = np.empty(c), np.empty(c)
        grad_sums = getattr(jit.bn_module(saved.act[0]), f"grad_sums_{dtype.name}")
        res, mode = (rows, 0) if saved.res is None else (_bn_rows(saved.res), 1)
        jit.run(grad_sums, c, WORK_PER_ELEMENT * dy.size, rows.reshape(shape3), _bn_rows(saved.y).reshape(shape3),
                _bn_rows(dy).reshape(shape3), saved.scale, saved.shift, res.reshape(shape3), mode, mean.astype(dtype),
                dtype.type(0), g.reshape(shape3), db, dxc, *map(dtype.type, saved.act[1]))
    elif compiled:  # Σ dy and Σ dy·(x − μ)
        db, dxc = np.empty(c), np.empty(c)
        jit.run(jit.loops().bn_grad_sums, c, WORK_PER_ELEMENT * dy.size, rows.reshape(n, c, width),
                grows.reshape(n, c, width), mean.astype(dtype), dtype.type(0), db, dxc)
    else:
        ones = np.ones(width, dtype=dtype)
        dsum = np.empty(n * c, dtype=dtype)
        dxsum = np.empty(n * c, dtype=dtype)

        def sums(r0, r1):
            gb = grows[r0:r1]
            np.matmul(gb, ones, out=dsum[r0:r1])
            _row_dots(rows[r0:r1], gb, ones, dxsum[r0:r1])

        _row_blocks(n * c, width, sums)
        db = dsum.reshape(n, c).astype(np.float64).sum(axis=0)
        # Σ dy·(x − μ) = Σ dy·x − μ·Σ dy: the subtraction per channel, in float64
        dxc = dxsum.reshape(n, c).astype(np.float64).sum(axis=0) - mean * db
    dw = dxc * invstd  # Σ dy·x̂
    count = n * width
    if training and ctx.bn_reduce is not None:  # dx through the global batch's statistics (sync_bn)
        total = ctx.bn_reduce(np.concatenate([[count], db, dxc]))  # μ is the global batch's: the sums add
        count, gdb = total[0], total[1:c + 1]
        gdw = total[c + 1:] * invstd
    else:
        gdb, gdw = db, dw  # the parameter gradients stay this batch's: the optimizer averages them
    k = invstd * params["weight"] if a.affine else invstd
    dparams = {"weight": dw.astype(dtype), "bias": db.astype(dtype)} if a.affine else {}
    if compiled:
        p = k * invstd * gdw / count if training else np.zeros(c)
        q = p * mean - k * gdb / count if training else np.zeros(c)
        jit.run(jit.loops().bn_grad_apply, n * c, WORK_PER_ELEMENT * dy.size, grows.reshape(n, c, width),
                rows.reshape(n, c, width), k.astype(dtype), (-p).astype(dtype), q.astype(dtype),
                dx.reshape(n, c, width), g is dx)
        return _with_residual(node, [dx], g if looped else dy), dparams
    drows, kr = dx.reshape(n * c, width), _per_row(k, n, dtype)
    if training:
        # dx = k·dy − p·(x − μ) − q = k·dy + b·x + c per channel, b and c in float64
        p = k * invstd * gdw / count
        br, cr = _per_row(-p, n, dtype), _per_row(p * mean - k * gdb / count, n, dtype)

        def grad(r0, r1):
            out = drows[r0:r1]
            np.multiply(grows[r0:r1], kr[r0:r1], out=out)
            t = rows[r0:r1] * br[r0:r1]
            out += t
            out += cr[r0:r1]
    else:
        def grad(r0, r1):
            np.multiply(grows[r0:r1], kr[r0:r1], out=drows[r0:r1])

    _row_blocks(n * c, width, grad)
    return _with_residual(node, [dx], dy), dparams


def _with_residual(node, dxs: list, g) -> list:
    """fused_bn with a residual input: its gradient g (the activation's) after x's."""
    return dxs + [g] if node.attrs.get("residual") else dxs


def _channel_window_sum(a: np.ndarray, before: int, after: int) -> np.ndarray:
    """Σ a[:, c−before … c+after] along axis 1, zeros outside the channels."""
    c = a.shape[1]
    padded = np.zeros((a.shape[0], c + before + after) + a.shape[2:], dtype=a.dtype)
    padded[:, before:before + c] = a
    out = padded[:, 0:c].copy()
    for o in range(1, before + after + 1):
        out += padded[:, o:o + c]
    return out


def lrn_forward(node, xs, params, ctx):
    (x,) = xs
    a = node.attrs
    n = int(a.size)
    # PyTorch's LocalResponseNorm: window n//2 channels before, (n−1)//2 after, divisor n
    d = _channel_window_sum(x * x, n // 2, (n - 1) // 2)
    d *= float(a.alpha) / n
    d += float(a.k)
    scale = d ** -float(a.beta)
    return x * scale, (x, d, scale)


def lrn_backward(node, saved, dy, params, ctx):
    x, d, scale = saved
    a = node.attrs
    n = int(a.size)
    # y_i = x_i d_i^−β, d_i = k + α/n Σ_{j∈win(i)} x_j²; j ∈ win(i) ⇔ i ∈ [j − (n−1)//2, j + n//2]
    t = dy * x * scale / d
    s = _channel_window_sum(t, (n - 1) // 2, n // 2)
    dx = dy * scale
    dx -= (2.0 * float(a.beta) * float(a.alpha) / n) * x * s
    return [dx], {}


# ---- merges --------------------------------------------------------------------------------

def add_forward(node, xs, params, ctx):
    y = xs[0] + xs[1]
    for v in xs[2:]:
        y += v
    return y, len(xs)


def add_backward(node, saved, dy, params, ctx):
    return [dy] * saved, {}  # the executor sums into new arrays, so sharing dy is safe


def concat_forward(node, xs, params, ctx):
    return np.concatenate(xs, axis=1), [v.shape[1] for v in xs]


def concat_backward(node, saved, dy, params, ctx):
    bounds = np.cumsum(saved)[:-1]
    return [np.ascontiguousarray(part) for part in np.split(dy, bounds, axis=1)], {}


KERNELS: dict[str, Kernel] = {
    "conv": Kernel(_conv.conv_forward, _conv.conv_backward),
    "maxpool": Kernel(_conv.maxpool_forward, _conv.maxpool_backward),
    "avgpool": Kernel(_conv.avgpool_forward, _conv.avgpool_backward),
    "globalavgpool": Kernel(_conv.globalavgpool_forward, _conv.globalavgpool_backward),
    "adaptive_avgpool": Kernel(_conv.adaptive_avgpool_forward, _conv.adaptive_avgpool_backward),
    "dense": Kernel(_dense.dense_forward, _dense.dense_backward),
    "flatten": Kernel(_dense.flatten_forward, _dense.flatten_backward),
    "softmax": Kernel(softmax_forward, softmax_backward),
    "dropout": Kernel(dropout_forward, dropout_backward),
    "identity": Kernel(identity_forward, identity_backward),
    "split": Kernel(identity_forward, identity_backward),  # a pass-through; its parts are channel slices
    "batchnorm": Kernel(batchnorm_forward, batchnorm_backward),
    "fused_bn": Kernel(fused_bn_forward, batchnorm_backward),
    "lrn": Kernel(lrn_forward, lrn_backward),
    "add": Kernel(add_forward, add_backward),
    "concat": Kernel(concat_forward, concat_backward),
    "fused_conv": Kernel(_fused.fused_conv_forward, _fused.fused_conv_backward),
    "fused_dense": Kernel(_fused.fused_dense_forward, _fused.fused_dense_backward),
    "elemwise_chain": Kernel(_fused.chain_forward, _fused.chain_backward),
    "layout_transform": Kernel(_fused.layout_forward, _fused.layout_backward),
    "mul": Kernel(_ch.mul_forward, _ch.mul_backward),
    "fused_mul": Kernel(_ch.fused_mul_forward, _ch.fused_mul_backward),
    "prelu": Kernel(_ch.prelu_forward, _ch.prelu_backward),
    "layer_scale": Kernel(_ch.layer_scale_forward, _ch.layer_scale_backward),
    "channel_shuffle": Kernel(_ch.channel_shuffle_forward, _ch.channel_shuffle_backward),
    "pad_channels": Kernel(_ch.pad_channels_forward, _ch.pad_channels_backward),
    "layernorm": Kernel(_ch.layernorm_forward, _ch.layernorm_backward),
    "groupnorm": Kernel(_ch.groupnorm_forward, _ch.groupnorm_backward),
    "stochastic_depth": Kernel(_ch.stochastic_depth_forward, _ch.stochastic_depth_backward),
    "channel_slice": Kernel(_ch.channel_slice_forward, _ch.channel_slice_backward),
}
