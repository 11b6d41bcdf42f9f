"""The executor (runtime/executor.py): each forward and backward pass runs in the backend's
pass scope. On the NumPy backend a batch of one splits its gemms over the C workers (cgemm.py),
so every kernel has the threads; where those are off, the scope hands the threads to BLAS. The
values are the same either way, within rounding."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from cnnc.backends.base import Ctx
from cnnc.backends.numpy import NumpyBackend, blas, cgemm, parallel
from cnnc.runtime.model import Model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _pass(model, x):
    """(output, gradients, the (our threads, BLAS's threads) each kernel saw) of a training pass."""
    seen = set()

    def spied(kernel):
        def forward(*a):
            seen.add((parallel.get_threads(), blas.get_threads()))
            return kernel.forward(*a)

        def backward(*a):
            seen.add((parallel.get_threads(), blas.get_threads()))
            return kernel.backward(*a)
        return type(kernel)(forward, backward)

    ex = model.executor
    kernels = [s.kernel for s in ex.plan.steps]
    for s in ex.plan.steps:
        object.__setattr__(s, "kernel", spied(s.kernel))
    try:
        y = ex.forward(x, Ctx(training=True))
        grads = ex.backward(np.ones_like(y))
    finally:
        for s, k in zip(ex.plan.steps, kernels):
            object.__setattr__(s, "kernel", k)
    return y, grads, seen


def _agree(y, grads, y_other, grads_other) -> None:
    """Outputs and gradients of two passes equal within rounding (sums taken in another order)."""
    np.testing.assert_allclose(y, y_other, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        scale = float(np.abs(grads_other[name]).max()) or 1.0
        assert float(np.abs(g - grads_other[name]).max()) <= 1e-4 * scale, name


def test_batch_1_splits_the_gemms_over_our_threads_or_hands_them_to_blas(two_threads, monkeypatch):
    """MobileNetV2 at batch 1 (1×1 gemms, depthwise convs, epilogues), forward and backward: with
    the split gemms every kernel sees two threads of ours and one of BLAS's; with them off, one of
    ours and BLAS's two; the values agree."""
    model = Model.load(EXAMPLES / "mobilenet_v2.cnn", seed=0)
    assert isinstance(model.backend, NumpyBackend)
    x = np.random.default_rng(0).standard_normal((1, *model.input_shape), dtype=np.float32)
    if not cgemm.available():
        pytest.skip("no C compiler or no single-threaded OpenBLAS: the split gemms are off")
    y, grads, seen = _pass(model, x)
    assert seen == {(2, 1)}
    monkeypatch.setattr(cgemm, "available", lambda dtype=np.float32: False)
    y_blas, grads_blas, seen = _pass(model, x)
    assert seen == {(1, 2)}
    _agree(y, grads, y_blas, grads_blas)


def test_without_the_split_gemms_batch_1_hands_the_threads_to_blas(two_threads, monkeypatch):
    """With cgemm off (no compiler, CNNC_JIT=0) the pass at batch 1 runs in the BLAS scope; without
    the scope at all, the kernels split their work as at larger batches; the values agree."""
    model = Model.load(EXAMPLES / "mobilenet_v2.cnn", seed=0)
    x = np.random.default_rng(1).standard_normal((1, *model.input_shape), dtype=np.float32)
    monkeypatch.setattr(cgemm, "available", lambda dtype=np.float32: False)
    y, grads, seen = _pass(model, x)
    assert seen == {(1, 2)}
    monkeypatch.setattr(NumpyBackend, "pass_scope", lambda self, batch: contextlib.nullcontext())
    y_split, grads_split, seen = _pass(model, x)
    assert seen == {(2, 1)}
    _agree(y, grads, y_split, grads_split)
