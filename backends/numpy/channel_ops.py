"""The NumPy backend's kernels for the channel and normalisation ops of modern blocks:
squeeze-excitation's `mul` (and `fused_mul`, the product with its gate's activation), `prelu`, ConvNeXt's `layer_scale`, `layernorm` and
`stochastic_depth`, `groupnorm`, ShuffleNet's `channel_shuffle` and `channel_slice`, and the
ResNet option-A shortcut's `pad_channels`.

Same contract as `kernels.py`: `forward(node, xs, params, ctx) -> (y, saved)`,
`backward(node, saved, dy, params, ctx) -> (dxs, dparams)`, NCHW (or N×F) arrays with the batch
first, PyTorch's semantics, the input's dtype kept; inputs and `dy` are never written.
"""

from __future__ import annotations

import numpy as np

from cnnc.compiler.ops import pad_channels_split

from . import celementwise as _cew
from . import elementwise as _ew
from .dense import _cast

# stochastic depth when the context brings no generator
_fallback_rng = np.random.default_rng()


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A (c,) vector (or a (1,) one) shaped to broadcast along axis 1 of an ndim-array."""
    return v.reshape((1, v.shape[0]) + (1,) * (ndim - 2))


def _non_channel_axes(a: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, a.ndim))


def _reduce_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a gradient of the broadcast result down to an operand's (N, C, 1, 1) shape."""
    if g.shape == shape:
        return g
    return g.sum(axis=(2, 3), keepdims=True)


# ---- mul ------------------------------------------------------------------------------------

def mul_forward(node, xs, params, ctx):
    a, b = xs
    return a * b, (a, b)


def mul_backward(node, saved, dy, params, ctx):
    a, b = saved
    return [_reduce_to(dy * b, a.shape), _reduce_to(dy * a, b.shape)], {}


def fused_mul_forward(node, xs, params, ctx):
    """y = x · act(g): x (N, C, H, W), g its (N, C, 1, 1) gate."""
    x, g = xs
    act = node.attrs.act()
    a = g if act is None else _ew.apply(act[0], act[1], g)
    y = _cew.scale_maps(x, a)  # each map by its gate in C on the threads, where it runs
    return (x * a if y is None else y), (x, g, a)


def fused_mul_backward(node, saved, dy, params, ctx):
    """dx = dy · act(g), dg = (Σ_hw dy · x) · act'(g, act(g))."""
    x, g, a = saved
    act = node.attrs.act()
    dg = _reduce_to(dy * x, g.shape)
    if act is not None:
        dg = _ew.grad(act[0], act[1], g, a, dg)
    return [dy * a, dg], {}


# ---- prelu, layer_scale ---------------------------------------------------------------------

def prelu_forward(node, xs, params, ctx):
    (x,) = xs
    w = _per_channel(_cast(params["weight"], x.dtype), x.ndim)
    return np.where(x > 0, x, x * w), x


def prelu_backward(node, saved, dy, params, ctx):
    x = saved
    w = _cast(params["weight"], dy.dtype)
    neg = x <= 0
    dx = np.where(neg, dy * _per_channel(w, dy.ndim), dy)
    dw = np.where(neg, dy * x, 0).sum(axis=_non_channel_axes(dy))
    if w.shape[0] == 1 and dy.shape[1] != 1:  # one shared slope
        dw = dw.sum(keepdims=True)
    return [dx], {"weight": dw.astype(dy.dtype, copy=False)}


def layer_scale_forward(node, xs, params, ctx):
    (x,) = xs
    return x * _per_channel(_cast(params["weight"], x.dtype), x.ndim), x


def layer_scale_backward(node, saved, dy, params, ctx):
    x = saved
    g = _cast(params["weight"], dy.dtype)
    return [dy * _per_channel(g, dy.ndim)], {"weight": (dy * x).sum(axis=_non_channel_axes(dy))}


# ---- channel_shuffle, channel_slice, pad_channels ------------------------------------------

def _shuffle(x: np.ndarray, groups: int) -> np.ndarray:
    n, c = x.shape[:2]
    return np.ascontiguousarray(x.reshape(n, groups, c // groups, *x.shape[2:]).swapaxes(1, 2)).reshape(x.shape)


def channel_shuffle_forward(node, xs, params, ctx):
    return _shuffle(xs[0], int(node.attrs.groups)), None


def channel_shuffle_backward(node, saved, dy, params, ctx):
    # the inverse permutation: the shuffle with k = C/g groups
    return [_shuffle(dy, dy.shape[1] // int(node.attrs.groups))], {}


def channel_slice_forward(node, xs, params, ctx):
    (x,) = xs
    lo, hi = node.attrs.bounds(x.shape[1])
    return np.ascontiguousarray(x[:, lo:hi]), x.shape


def channel_slice_backward(node, saved, dy, params, ctx):
    lo, hi = node.attrs.bounds(saved[1])
    dx = np.zeros(saved, dtype=dy.dtype)
    dx[:, lo:hi] = dy
    return [dx], {}


def pad_channels_forward(node, xs, params, ctx):
    (x,) = xs
    a = node.attrs
    s = int(a.stride)
    sub = x[:, :, ::s, ::s]
    before, _ = pad_channels_split(a, x.shape[1])
    y = np.zeros((x.shape[0], a.to) + sub.shape[2:], dtype=x.dtype)
    y[:, before:before + x.shape[1]] = sub
    return y, x.shape


def pad_channels_backward(node, saved, dy, params, ctx):
    a = node.attrs
    s = int(a.stride)
    c = saved[1]
    before, _ = pad_channels_split(a, c)
    dx = np.zeros(saved, dtype=dy.dtype)
    dx[:, :, ::s, ::s] = dy[:, before:before + c]
    return [dx], {}


# ---- layernorm, groupnorm -------------------------------------------------------------------

def _affine(y: np.ndarray, params, dtype) -> np.ndarray:
    y *= _per_channel(_cast(params["weight"], dtype), y.ndim)
    y += _per_channel(_cast(params["bias"], dtype), y.ndim)
    return y


def _standardize(v: np.ndarray, axis: int, eps: float):
    """(x̂, σ⁻¹): v less its mean over `axis`, over its biased standard deviation there."""
    xhat = v - v.mean(axis=axis, keepdims=True)
    inv = 1.0 / np.sqrt(np.mean(xhat * xhat, axis=axis, keepdims=True) + eps)
    xhat *= inv
    return xhat, inv


def _standardize_grad(g: np.ndarray, xhat: np.ndarray, inv, axis: int) -> np.ndarray:
    """dx = σ⁻¹·(g − mean(g) − x̂·mean(g·x̂)), the means over the statistics' `axis`."""
    dx = g - g.mean(axis=axis, keepdims=True)
    dx -= xhat * (g * xhat).mean(axis=axis, keepdims=True)
    dx *= inv
    return dx


def _norm_output(node, xhat, params, dtype):
    return (_affine(xhat.copy(), params, dtype) if node.attrs.affine else xhat), xhat


def _affine_grad(node, dy, xhat, params):
    """(d x̂, dparams) through the per-channel scale and shift."""
    if not node.attrs.affine:
        return dy, {}
    axes = _non_channel_axes(dy)
    dparams = {"weight": (dy * xhat).sum(axis=axes), "bias": dy.sum(axis=axes)}
    return dy * _per_channel(_cast(params["weight"], dy.dtype), dy.ndim), dparams


def layernorm_forward(node, xs, params, ctx):
    """Mean and biased variance over the channels of each (n, h, w) position."""
    (x,) = xs
    xhat, inv = _standardize(x, 1, float(node.attrs.eps))
    y, xhat = _norm_output(node, xhat, params, x.dtype)
    return y, (xhat, inv)


def layernorm_backward(node, saved, dy, params, ctx):
    xhat, inv = saved
    g, dparams = _affine_grad(node, dy, xhat, params)
    return [_standardize_grad(g, xhat, inv, 1)], dparams


def groupnorm_forward(node, xs, params, ctx):
    """Per sample and group: mean and biased variance over the group's channels and positions."""
    (x,) = xs
    xhat, inv = _standardize(x.reshape(x.shape[0], int(node.attrs.groups), -1), 2, float(node.attrs.eps))
    y, xhat = _norm_output(node, xhat.reshape(x.shape), params, x.dtype)
    return y, (xhat, inv)


def groupnorm_backward(node, saved, dy, params, ctx):
    xhat, inv = saved
    g, dparams = _affine_grad(node, dy, xhat, params)
    grouped = (dy.shape[0], int(node.attrs.groups), -1)
    dx = _standardize_grad(g.reshape(grouped), xhat.reshape(grouped), inv, 2)
    return [dx.reshape(dy.shape)], dparams


# ---- stochastic_depth -----------------------------------------------------------------------

def stochastic_depth_forward(node, xs, params, ctx):
    (x,) = xs
    rate = float(node.attrs.rate)
    if not ctx.training or rate == 0.0:
        return x, None
    rng = getattr(ctx, "rng", None) or _fallback_rng
    # one draw per sample: its whole tensor kept (scaled by 1/(1−rate)) or zeroed
    keep = (rng.random(x.shape[0], dtype=np.float32) >= rate).astype(x.dtype) * (1.0 / (1.0 - rate))
    mask = keep.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask, mask


def stochastic_depth_backward(node, saved, dy, params, ctx):
    return [dy if saved is None else dy * saved], {}
