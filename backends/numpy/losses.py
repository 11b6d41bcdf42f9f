"""Losses for the NumPy backend: `fn(prediction, target, **options) -> (mean loss, gradient)`.

Both match torch.nn.functional with reduction="mean"; the gradient is d(mean loss)/d(prediction)
in the prediction's dtype.
"""

from __future__ import annotations

import numpy as np

from cnnc.dsl.errors import CnncError


def cross_entropy(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0):
    """Softmax cross-entropy of (N, C) logits against integer labels (N,), as F.cross_entropy.

    With label smoothing ε the target is (1−ε)·one-hot + ε/C. Log-sum-exp keeps it stable.
    """
    if logits.ndim != 2:
        raise CnncError(f"cross_entropy needs (batch, classes) logits, got shape {logits.shape}")
    n, c = logits.shape
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise CnncError(f"cross_entropy needs {n} integer labels, got shape {labels.shape} of {labels.dtype}")
    # the ufuncs' reductions called directly: ndarray.min/max/mean go through NumPy's Python wrappers,
    # a few µs a call in a training step where each Python call counts (the same values)
    low, high = (int(np.minimum.reduce(labels)), int(np.maximum.reduce(labels))) if n else (0, 0)
    if low < 0 or high >= c:
        raise CnncError(f"cross_entropy labels must lie in 0…{c - 1}, got {low}…{high}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise CnncError(f"label_smoothing must lie in [0, 1], got {eps}")
    rows = np.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    logp = z - lse
    per_sample = -(1.0 - eps) * logp[rows, labels]
    if eps:
        per_sample -= eps * logp.mean(axis=1)
    loss = float(np.add.reduce(per_sample, dtype=np.float64) / n) if n else float("nan")  # = mean(dtype=float64)
    grad = np.exp(logp)  # softmax − target, over the batch
    grad[rows, labels] -= 1.0 - eps
    if eps:
        grad -= eps / c
    if n:
        grad *= 1.0 / n
    return loss, grad


def mse(pred: np.ndarray, target: np.ndarray):
    """Mean of squared differences over all elements, as F.mse_loss."""
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise CnncError(f"mse needs a target of the prediction's shape {pred.shape}, got {target.shape}")
    diff = pred - target.astype(pred.dtype, copy=False)
    loss = float(np.mean(np.square(diff), dtype=np.float64))
    diff *= 2.0 / diff.size
    return loss, diff


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}
