"""Whole networks, forward and backward, against PyTorch running the same graph with the same weights:
LeNet-5 and ResNet-20 from the zoo, a GoogLeNet inception block and a DenseNet dense block."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cnnc.backends.base import Ctx  # noqa: E402
from cnnc.compiler.pipeline import PassContext, run_pipeline  # noqa: E402
from cnnc.dsl import load_text  # noqa: E402
from cnnc.runtime.model import Model  # noqa: E402

from conftest import EXAMPLES  # noqa: E402
from torch_ref import run_torch  # noqa: E402

INCEPTION = """\
network inception_block
input 32x12x12
block inception(c1, c3r, c3, c5r, c5, pp):
    b1 = in -> conv c1 1x1 -> relu
    b2 = in -> conv c3r 1x1 -> relu -> conv c3 3x3 pad=1 -> relu
    b3 = in -> conv c5r 1x1 -> relu -> conv c5 5x5 pad=2 -> relu
    b4 = in -> maxpool 3x3 stride=1 pad=1 -> conv pp 1x1 -> relu
    concat(b1, b2, b3, b4)
layers:
    inception(8, 6, 12, 4, 6, 6) -> gap -> dense 5
"""

DENSE_BLOCK = """\
network dense_block
input 8x10x10
default conv bias=false
block dense_layer(growth):
    new = bn -> relu -> conv 4*growth 1x1 -> bn -> relu -> conv growth 3x3 pad=1
    concat(in, new)
layers:
    dense_layer(6) * 4 -> bn -> relu -> avgpool 2x2 stride=2 -> gap -> dense 3
"""


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def model_from(text: str | None = None, path=None) -> Model:
    if path is not None:
        return Model.load(path, seed=3)
    g = run_pipeline(load_text(text, "t.cnn"), PassContext(verify=True))
    return Model(g, seed=3)


CASES = {
    "lenet5": lambda: model_from(path=EXAMPLES / "lenet5.cnn"),
    "resnet20_cifar": lambda: model_from(path=EXAMPLES / "resnet20_cifar.cnn"),
    "inception_block": lambda: model_from(INCEPTION),
    "dense_block": lambda: model_from(DENSE_BLOCK),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_and_backward_match_torch(name, training):
    model = CASES[name]()
    rng = np.random.default_rng(0)
    # BatchNorm running statistics away from their initial values, so eval mode uses them for real
    for k, v in model.params.items():
        if k.endswith("running_mean"):
            v[...] = rng.normal(0, 0.1, v.shape)
        elif k.endswith("running_var"):
            v[...] = rng.uniform(0.5, 1.5, v.shape)
    before = {k: v.copy() for k, v in model.params.items()}
    x = rng.normal(size=(3, *model.input_shape)).astype(np.float32)
    out = model.executor.forward(x, Ctx(training=training), keep=True)
    r = rng.normal(size=out.shape).astype(np.float32)
    grads = model.executor.backward(r)

    ref_out, leaves = run_torch(model.graph, before, x, training=training)
    (ref_out * torch.tensor(r)).sum().backward()
    assert rel(out, ref_out.detach().numpy()) <= 1e-5
    checked = 0
    for k, leaf in leaves.items():
        if leaf.grad is None:
            continue
        assert rel(grads[k], leaf.grad.numpy()) <= 1e-5, k
        checked += 1
    assert checked == sum(1 for k in model.params if not k.endswith(("running_mean", "running_var")))
    if training:  # running statistics moved the same way
        for k in model.params:
            if k.endswith(("running_mean", "running_var")):
                assert rel(model.params[k], leaves[k].detach().numpy()) <= 1e-5, k
