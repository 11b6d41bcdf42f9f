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
    assert "all 72 layers agree" in r.out


def _swap_backend(monkeypatch, name, backend_cls):
    real = parity_mod.Model.__init__

    def init(self, graph, backend_name="numpy", seed=None, path=None):
        real(self, graph, "numpy", seed, path)
        if backend_name == name:
            self.backend = backend_cls()
            self.plan = self.backend.compile(graph)
            from cnnc.runtime.executor import Executor
            self.executor = Executor(self.plan, self.backend, self.params)

    monkeypatch.setattr(parity_mod.Model, "__init__", init)


def test_rounding_differences_are_not_flagged_where_the_network_amplifies_them(monkeypatch):
    """ResNet-50 at 64×64, batch 2, training mode: BatchNorm over 8 values per channel in the last
    stage makes the gradients percent-sensitive to the last bit of every conv output. A backend
    that rounds its conv outputs differently (one float32 ulp, as another summation order would)
    must pass; the same backend with a wrong relu must still be caught at that relu."""
    conv = NumpyBackend.kernels["conv"]

    def reordered_forward(node, xs, params, ctx):
        y, saved = conv.forward(node, xs, params, ctx)
        ulp = np.where(np.random.default_rng(node.id).random(y.shape) < 0.5, -1, 1) * np.spacing(y)
        return (y + ulp).astype(np.float32), saved

    class Reordered(NumpyBackend):
        name = "reordered"
        kernels = {**NumpyBackend.kernels, "conv": Kernel(reordered_forward, conv.backward)}

    _swap_backend(monkeypatch, "reordered", Reordered)
    rows, first_bad = parity_mod.parity(EXAMPLES / "resnet50.cnn", ("numpy", "reordered"), input_size=(64, 64))
    assert max(r["grad"] for r in rows if r["grad"] is not None) > 1e-3  # really amplified...
    assert first_bad is None  # ...and still within the measured floor


def test_a_wrong_kernel_is_flagged_at_its_layer(monkeypatch):
    relu = NumpyBackend().kernel("relu")  # the element-wise kernel every formula op runs

    def leaky_forward(node, xs, params, ctx):  # a subtly wrong relu: lets negatives through
        y, saved = relu.forward(node, xs, params, ctx)
        return y + 0.01 * np.minimum(xs[0], 0), saved

    class Broken(NumpyBackend):
        name = "broken"
        kernels = {**NumpyBackend.kernels, "relu": Kernel(leaky_forward, relu.backward)}

    _swap_backend(monkeypatch, "broken", Broken)
    rows, first_bad = parity_mod.parity(EXAMPLES / "resnet20_cifar.cnn",
                                        ("numpy", "broken"))
    assert first_bad == "relu1"
    assert rows[0]["forward"] == 0 and rows[0]["grad"] > 0  # conv1 computes right; its gradient inherits the error


def test_dropout_is_left_out_since_each_backend_draws_its_own_masks(monkeypatch, tmp_path):
    dropout = NumpyBackend.kernels["dropout"]

    def other_masks(node, xs, params, ctx):  # a correct dropout with another random stream
        ctx.rng.random()
        return dropout.forward(node, xs, params, ctx)

    class OwnMasks(NumpyBackend):
        name = "own_masks"
        kernels = {**NumpyBackend.kernels, "dropout": Kernel(other_masks, dropout.backward)}

    _swap_backend(monkeypatch, "own_masks", OwnMasks)
    net = tmp_path / "drop.cnn"
    net.write_text("network drop\ninput 1x16x16\nclasses 10\n\nlayers:\n    conv 8 3x3 -> relu -> maxpool 2x2\n"
                   "    flatten -> dropout 0.5 -> dense 32 -> relu\n    dropout 0.5 -> dense classes\n")
    rows, first_bad = parity_mod.parity(net, ("numpy", "own_masks"))
    assert first_bad is None
    assert not any(r["op"] == "dropout" for r in rows)
