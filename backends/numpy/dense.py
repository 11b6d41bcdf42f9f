"""The NumPy backend's dense and flatten kernels (used by the fused dense kernel too).

Same contract as `kernels.py`: `forward(node, xs, params, ctx) -> (y, saved)`,
`backward(node, saved, dy, params, ctx) -> (dxs, dparams)`, PyTorch's semantics.
"""

from __future__ import annotations

import numpy as np


def _cast(a: np.ndarray, dtype) -> np.ndarray:
    return a.astype(dtype, copy=False)


def dense_forward(node, xs, params, ctx):
    (x,) = xs
    x2 = x.reshape(x.shape[0], -1)  # (N, C, 1, 1) → (N, C)
    y = x2 @ _cast(params["weight"], x.dtype).T
    if "bias" in params:
        y += _cast(params["bias"], x.dtype)
    return y, (x2, x.shape)


def dense_backward(node, saved, dy, params, ctx):
    x2, shape = saved
    w = _cast(params["weight"], dy.dtype)
    dparams = {"weight": dy.T @ x2}
    if "bias" in params:
        dparams["bias"] = dy.sum(axis=0)
    return [(dy @ w).reshape(shape)], dparams


def flatten_forward(node, xs, params, ctx):
    (x,) = xs
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(node, saved, dy, params, ctx):
    return [dy.reshape(saved)], {}
