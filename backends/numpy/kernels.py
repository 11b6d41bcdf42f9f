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
from . import parallel
from .dense import _cast

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

def _bn_axes(x: np.ndarray) -> tuple[int, ...]:
    """Reduction axes for (N, C, H, W) or (N, C)."""
    return (0, 2, 3) if x.ndim == 4 else (0,)


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A (c,) vector shaped to broadcast along axis 1 of an ndim-array."""
    return v.reshape((1, v.shape[0]) + (1,) * (ndim - 2))


def _channel_sum(a: np.ndarray, axes) -> np.ndarray:
    """Σ over all axes but 1. For (N, C, H, W), rows of H·W times a vector of ones (BLAS), then over
    N: faster than NumPy's reduction over axes (0, 2, 3), and it needs no temporary."""
    if a.ndim != 4:
        return a.sum(axis=axes)
    n, c = a.shape[:2]
    return (a.reshape(n, c, -1) @ np.ones(a.shape[2] * a.shape[3], dtype=a.dtype)).sum(axis=0)


def _channel_dot(a: np.ndarray, b: np.ndarray, axes) -> np.ndarray:
    """Σ a·b over all axes but 1, as one BLAS dot product per (image, channel) row: no a·b temporary."""
    if a.ndim != 4:
        return (a * b).sum(axis=axes)
    n, c = a.shape[:2]
    rows = np.matmul(a.reshape(n, c, 1, -1), b.reshape(n, c, -1, 1))
    return rows.reshape(n, c).sum(axis=0)


def batchnorm_forward(node, xs, params, ctx):
    (x,) = xs
    a = node.attrs
    axes, nd, c = _bn_axes(x), x.ndim, x.shape[1]
    dtype = x.dtype
    training = bool(ctx.training)
    count = x.size // c
    m, eps = float(a.momentum), float(a.eps)
    rm, rv = params["running_mean"], params["running_var"]
    xhat = np.empty_like(x)
    y = np.empty_like(x) if a.affine else xhat
    invstd = np.empty(c, dtype=dtype)

    def part(c0, c1):  # channels are independent: threads take a slice each
        xs_, xh = x[:, c0:c1], xhat[:, c0:c1]
        if training:
            mean = _channel_sum(xs_, axes) / count
            np.subtract(xs_, _per_channel(mean, nd), out=xh)
            var = _channel_dot(xh, xh, axes) / count  # biased: normalises the batch
            rm[c0:c1] *= 1.0 - m  # in place: the buffers are the executor's arrays
            rm[c0:c1] += m * mean
            rv[c0:c1] *= 1.0 - m
            rv[c0:c1] += (m * count / max(count - 1, 1)) * var  # unbiased, as PyTorch stores it
        else:
            np.subtract(xs_, _per_channel(_cast(rm[c0:c1], dtype), nd), out=xh)
            var = _cast(rv[c0:c1], dtype)
        inv = 1.0 / np.sqrt(var + eps)
        invstd[c0:c1] = inv
        xh *= _per_channel(inv, nd)
        if a.affine:
            np.multiply(xh, _per_channel(_cast(params["weight"][c0:c1], dtype), nd), out=y[:, c0:c1])
            y[:, c0:c1] += _per_channel(_cast(params["bias"][c0:c1], dtype), nd)

    parallel.run(part, parallel.chunks(c, 4 * x.size))
    return y, (xhat, invstd, training)


def batchnorm_backward(node, saved, dy, params, ctx):
    xhat, invstd, training = saved
    axes, nd, c = _bn_axes(dy), dy.ndim, dy.shape[1]
    dtype = dy.dtype
    scale = invstd * _cast(params["weight"], dtype) if node.attrs.affine else invstd
    inv_n = 1.0 / (dy.size // c)
    dx = np.empty_like(dy)
    db, dw = np.empty(c, dtype=dtype), np.empty(c, dtype=dtype)

    def part(c0, c1):
        dys, xh, out = dy[:, c0:c1], xhat[:, c0:c1], dx[:, c0:c1]
        db[c0:c1] = _channel_sum(dys, axes)
        dw[c0:c1] = _channel_dot(dys, xh, axes)
        if training:
            # through the batch statistics: dx = γ·σ⁻¹·(dy − mean(dy) − x̂·mean(dy·x̂))
            np.subtract(dys, _per_channel(db[c0:c1] * inv_n, nd), out=out)
            out -= xh * _per_channel(dw[c0:c1] * inv_n, nd)
            out *= _per_channel(scale[c0:c1], nd)
        else:
            np.multiply(dys, _per_channel(scale[c0:c1], nd), out=out)

    parallel.run(part, parallel.chunks(c, 4 * dy.size))
    return [dx], ({"weight": dw, "bias": db} if node.attrs.affine else {})


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
