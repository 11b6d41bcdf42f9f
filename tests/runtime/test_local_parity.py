"""runtime/parity.py local_parity, the comparison the GPU zoo test makes, on the CPU: a backend whose conv
results differ from NumPy's by rounding alone (every output moved by two ulps of the layer's
largest value, what another summation order does) is flagged by whole-network parity when a
ReLU pre-activation lies between the two results (VGG-19's stage4.relu3 on the GPU: 6.1e-6 in
NumPy, -1.1e-6 in CUDA), and passes layer-local parity; a backend with a real fault in one
kernel is flagged by layer-local parity at that layer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cnnc.backends.base import Ctx, Kernel
from cnnc.runtime.executor import Executor
from cnnc.runtime.model import Model
from cnnc.runtime.parity import FLOOR_FACTOR, FLOOR_RUNS, _with_rounding_noise, rel

from cnnc.runtime.parity import local_parity, network

KINK = """network kink
input image: 2x3x3
classes 4

layers:
    conv 3 1x1 -> relu -> flatten -> dense classes
"""


def _shift_conv_outputs(model: Model, ulps: float) -> None:
    """The model's conv results moved down by `ulps` float32 ulps of each output's largest value."""
    def shifted(kernel):
        def forward(node, xs, params, ctx):
            y, saved = kernel.forward(node, xs, params, ctx)
            return (y - ulps * np.spacing(np.abs(y).max())).astype(y.dtype), saved
        return Kernel(forward, kernel.backward)
    model.plan.steps = [replace(s, kernel=shifted(s.kernel)) if s.node.op == "conv" else s for s in model.plan.steps]
    model.executor = Executor(model.plan, model.backend, model.params)


def _kinked_params(model: Model, x: np.ndarray) -> None:
    """Conv bias set so that one pre-activation is one ulp of the layer's largest value above zero."""
    w = model.params["conv1.weight"]
    z = np.einsum("kc,nchw->nkhw", w[:, :, 0, 0], x) + model.params["conv1.bias"].reshape(1, -1, 1, 1)
    big = np.abs(z).max()
    model.params["conv1.bias"][0] -= z[0, 0, 1, 1] - np.spacing(np.float32(big))


def _grads(model: Model, x, seed=0) -> dict:
    out = model.executor.forward(x, Ctx(training=True, rng=np.random.default_rng(seed)))
    r = np.random.default_rng(seed + 1).normal(size=out.shape).astype(np.float32)
    return model.executor.backward(r)


def test_rounding_at_a_relu_kink_fools_whole_network_parity_not_layer_parity(tmp_path):
    (tmp_path / "kink.cnn").write_text(KINK, encoding="utf-8")
    g = network(tmp_path / "kink.cnn")
    x = np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32)  # layer_parity's input, seed 0
    ref = Model(g, "numpy", 0)
    _kinked_params(ref, x)
    other = Model(g, "numpy", 0)
    other.set_params(ref.host_params())
    _shift_conv_outputs(other, 2)
    # whole network, as `cnnc parity` judges it: the conv's weight gradient is far over its floor
    want, got = _grads(ref, x), _grads(other, x)
    floors = []
    for k in range(FLOOR_RUNS):
        noisy = _with_rounding_noise(Model(g, "numpy", 0), 10 + k)
        noisy.set_params(ref.host_params())
        floors.append(rel(_grads(noisy, x)["conv1.weight"], want["conv1.weight"]))
    diff = rel(got["conv1.weight"], want["conv1.weight"])
    assert diff > max(1e-4, FLOOR_FACTOR * max(floors)), (diff, floors)
    # layer by layer: every layer agrees
    rows, first_bad = local_parity(g, "numpy", adjust=lambda m: _shift_conv_outputs(m, 2), reference_model=ref)
    assert first_bad is None, rows
    assert {r["layer"] for r in rows} == {"conv1", "relu1", "flatten1", "dense1"}


def test_layer_parity_flags_the_layer_with_a_wrong_kernel(tmp_path):
    (tmp_path / "kink.cnn").write_text(KINK, encoding="utf-8")
    g = network(tmp_path / "kink.cnn")

    def wrong_relu_backward(model):
        def broken(kernel):
            def backward(node, saved, dy, params, ctx):
                dxs, dps = kernel.backward(node, saved, dy, params, ctx)
                return [d * np.float32(1.001) for d in dxs], dps  # 0.1% off: a real fault
            return Kernel(kernel.forward, backward)
        model.plan.steps = [replace(s, kernel=broken(s.kernel)) if s.node.op == "relu" else s
                            for s in model.plan.steps]
        model.executor = Executor(model.plan, model.backend, model.params)

    rows, first_bad = local_parity(g, "numpy", adjust=wrong_relu_backward)
    assert first_bad == "relu1"
    assert [r["layer"] for r in rows if r["bad"]] == ["relu1"]


def test_parity_local_command_numpy_against_itself():
    from conftest import EXAMPLES, run_cli

    r = run_cli("parity", str(EXAMPLES / "lenet5.cnn"), "--backends", "numpy,numpy", "--local")
    assert r.code == 0, r.err
    rows = [line for line in r.out.splitlines() if line.startswith(("conv", "relu", "pool", "dense"))]
    assert rows and all(line.split()[2] == "0.00e+00" for line in rows)  # same kernels, same inputs: exact
    assert "each layer on numpy's inputs and output gradient: all" in r.out and "layers agree" in r.out
