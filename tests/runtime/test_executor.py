"""The executor (runtime/executor.py): each forward and backward pass runs in the backend's
pass scope; on the NumPy backend a batch of one then hands the threads to BLAS."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from cnnc.backends.base import Ctx
from cnnc.backends.numpy import NumpyBackend, blas, parallel
from cnnc.runtime.model import Model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_executor_runs_batch_1_in_the_scope_with_the_same_outputs(two_threads, monkeypatch):
    """MobileNetV2 at batch 1 (1×1 gemms, depthwise convs, epilogues): every kernel sees one thread
    of ours and BLAS's two, in forward and backward; the values equal the split path's."""
    model = Model.load(EXAMPLES / "mobilenet_v2.cnn", seed=0)
    assert isinstance(model.backend, NumpyBackend)
    x = np.random.default_rng(0).standard_normal((1, *model.input_shape), dtype=np.float32)
    seen = set()

    def spied(kernel):
        def forward(*a):
            seen.add((parallel.get_threads(), blas.get_threads()))
            return kernel.forward(*a)

        def backward(*a):
            seen.add((parallel.get_threads(), blas.get_threads()))
            return kernel.backward(*a)
        return type(kernel)(forward, backward)

    for s in model.executor.plan.steps:
        object.__setattr__(s, "kernel", spied(s.kernel))
    ex = model.executor
    y = ex.forward(x, Ctx(training=True))
    grads = ex.backward(np.ones_like(y))
    assert seen == {(1, 2)}
    monkeypatch.setattr(NumpyBackend, "pass_scope", lambda self, batch: contextlib.nullcontext())
    seen.clear()
    y_split = ex.forward(x, Ctx(training=True))
    grads_split = ex.backward(np.ones_like(y))
    assert seen == {(2, 1)}
    np.testing.assert_allclose(y, y_split, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        scale = float(np.abs(grads_split[name]).max()) or 1.0
        assert float(np.abs(g - grads_split[name]).max()) <= 1e-4 * scale, name
