"""`cnnc parity` compares backends layer by layer; numpy against itself is exact, and a backend
that is wrong in one kernel is caught at that layer."""

from __future__ import annotations

import numpy as np

from cnnc.backends.base import Kernel
from cnnc.backends.numpy import NumpyBackend
from cnnc.runtime import parity as parity_mod

from conftest import EXAMPLES, run_cli


def test_numpy_against_numpy_is_exact():
    r = run_cli("parity", str(EXAMPLES / "resnet20_cifar.cnn"), "--backends", "numpy,numpy")
    assert r.code == 0, r.err
    assert "all 72 layers within" in r.out


def test_a_wrong_kernel_is_flagged_at_its_layer(monkeypatch):
    relu = NumpyBackend.kernels["relu"]

    def leaky_forward(node, xs, params, ctx):  # a subtly wrong relu: lets negatives through
        y, saved = relu.forward(node, xs, params, ctx)
        return y + 0.01 * np.minimum(xs[0], 0), saved

    class Broken(NumpyBackend):
        name = "broken"
        kernels = {**NumpyBackend.kernels, "relu": Kernel(leaky_forward, relu.backward)}

    real = parity_mod.Model.__init__

    def init(self, graph, backend_name="numpy", seed=None, path=None):
        real(self, graph, "numpy", seed, path)
        if backend_name == "broken":
            self.backend = Broken()
            self.plan = self.backend.compile(graph)
            from cnnc.runtime.executor import Executor
            self.executor = Executor(self.plan, self.backend, self.params)

    monkeypatch.setattr(parity_mod.Model, "__init__", init)
    rows, first_bad = parity_mod.parity(EXAMPLES / "resnet20_cifar.cnn",
                                        ("numpy", "broken"))
    assert first_bad == "relu1"
    assert rows[0]["forward"] == 0 and rows[0]["grad"] > 0  # conv1 computes right; its gradient inherits the error
