"""The channel and normalisation ops of modern blocks in small networks: a squeeze-excitation
block (mul), a ConvNeXt block (layernorm, gelu, layer_scale, stochastic_depth), a ShuffleNetV2
unit (channel_slice, concat, channel_shuffle), a ResNet option-A shortcut (pad_channels + add),
and prelu with groupnorm. Each checks, trains a few steps, compiles at -O2 and the artifact runs;
the checked graph also agrees with PyTorch running the op table's equivalents on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnc.compiler.pipeline import PassContext, run_pipeline
from cnnc.dsl import load_text
from cnnc.runtime.model import Model

from conftest import EXAMPLES, make_data, run_cli

TRAIN = """\
train:
    optimizer momentum momentum=0.9
    lr 0.05
    batch 16
    epochs 1
    seed 1
"""

NETS = {
    "squeeze_excitation": """\
network se
input 1x8x8
classes 4
block se(c, r=4):
    x = in
    gap -> conv c//r 1x1 -> relu -> conv c 1x1 -> hardsigmoid -> mul(x)
block se_gate_second(c):
    s = in -> gap -> conv c 1x1 -> sigmoid
    in -> mul(s)
layers:
    conv 8 3x3 pad=1 -> bn -> relu -> se(8) -> maxpool 2
    conv 8 3x3 pad=1 -> relu -> se_gate_second(8) -> gap -> dense classes
""",
    "convnext": """\
network convnext
input 1x8x8
classes 4
block convnext(c, drop):
    conv c 7x7 pad=3 groups=c -> layernorm -> conv 4*c 1x1 -> gelu -> conv c 1x1 -> layer_scale init=0.1
    stochastic_depth drop -> add(in)
layers:
    conv 8 2x2 stride=2 -> layernorm
    convnext(8, 0.1) -> convnext(8, 0.2)
    gap -> layernorm -> dense classes
""",
    "shufflenet": """\
network shufflenet
input 1x8x8
classes 4
default conv bias=false
block shuffle_unit(c):
    a = in -> channel_slice 0 c//2
    b = in -> channel_slice c//2 c -> conv c//2 1x1 -> bn -> relu
    b = b -> conv c//2 3x3 pad=1 groups=c//2 -> bn -> conv c//2 1x1 -> bn -> relu
    concat(a, b) -> channel_shuffle 2
layers:
    conv 8 3x3 pad=1 -> bn -> relu
    shuffle_unit(8) * 2
    gap -> dense classes
""",
    "shufflenet_split": """\
network shufflenet_split
input 1x8x8
classes 4
default conv bias=false
block shuffle_unit(c):
    a, b = in -> split 2
    b = b -> conv c//2 1x1 -> bn -> relu -> conv c//2 3x3 pad=1 groups=c//2 -> bn -> conv c//2 1x1 -> bn -> relu
    concat(a, b) -> channel_shuffle 2
layers:
    conv 8 3x3 pad=1 -> bn -> relu
    shuffle_unit(8) * 2
    gap -> dense classes
""",
    "resnet_option_a": """\
network resnet_a
input 1x8x8
classes 4
default conv bias=false round=floor
block basic_a(c, stride=2):
    short = in -> pad_channels c stride=stride
    in -> conv c 3x3 stride=stride pad=1 -> bn -> relu
    conv c 3x3 pad=1 -> bn -> add(short) -> relu
layers:
    conv 4 3x3 pad=1 -> bn -> relu
    basic_a(8) -> basic_a(13, stride=1)
    gap -> dense classes
""",
    "prelu_groupnorm": """\
network prelu_gn
input 1x8x8
classes 4
layers:
    conv 8 3x3 pad=1 -> groupnorm 2 -> prelu -> maxpool 2
    conv 8 3x3 pad=1 -> groupnorm 8 affine=false -> prelu shared=true -> gap -> dense classes
""",
}

# what each network's -O2 report must say about its new ops
REPORTED = {
    "squeeze_excitation": ["hardsigmoid + mul → fused hardsigmoid_mul", "sigmoid + mul → fused sigmoid_mul"],
    "convnext": ["removed stochastic_depth", "conv + ls → conv with folded layer_scale"],
    "resnet_option_a": ["conv + bn + add + relu → fused conv_bn_add_relu"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "data.npz", n=48)


@pytest.mark.parametrize("name", list(NETS))
def test_a_network_using_them_checks_trains_and_compiles(name, data, tmp_path):
    net = tmp_path / f"{name}.cnn"
    net.write_text(NETS[name] + TRAIN)
    r = run_cli("check", str(net))
    assert r.code == 0, r.err

    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp_path / "run"), "-q", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert np.isfinite(summary["train_loss"]) and summary["train_loss"] < summary["initial_loss"] * 1.5, summary

    r = run_cli("compile", str(net), "-O2", "--report", "-o", str(tmp_path / "art"))
    assert r.code == 0, r.err
    for line in REPORTED.get(name, []):
        assert line in r.out, r.out

    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = run_cli("run", str(tmp_path / "art"), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.code == 0, r.err
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (2, 4) and np.isfinite(y).all()


@pytest.mark.parametrize("name", list(NETS))
def test_the_network_agrees_with_torch(name):
    torch = pytest.importorskip("torch")
    from torch_ref import run_torch

    g = run_pipeline(load_text(NETS[name], "t.cnn"), PassContext(verify=True))
    model = Model(g, seed=3)
    rng = np.random.default_rng(0)
    for k, v in model.params.items():  # learnable slopes and scales away from their starting values
        if k.endswith(".weight") and v.ndim == 1:
            v[...] = rng.uniform(0.5, 1.5, v.shape)
    before = {k: v.copy() for k, v in model.params.items()}
    x = rng.normal(size=(3, 1, 8, 8)).astype(np.float32)
    ours = model(x)
    ref, _ = run_torch(model.graph, before, x)
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert torch.is_tensor(ref)


@pytest.mark.parametrize("layers, message", [
    ("conv 4 3x3 -> mul(in)", "mul of tensors with shapes 4×6×6 and 1×8×8"),
    ("conv 6 3x3 -> channel_shuffle 4", "channel_shuffle groups=4 does not divide the 6 channels"),
    ("conv 6 3x3 -> groupnorm 4", "groupnorm groups=4 does not divide the 6 channels"),
    ("conv 6 3x3 -> pad_channels 4", "pad_channels to=4 is fewer than the 6 input channels"),
    ("conv 6 3x3 -> channel_slice 2 7", "channel_slice 2 7 of 6 channels"),
    ("conv 6 3x3 -> channel_slice 3 3", "channel_slice 3 3 of 6 channels"),
    ("conv 6 3x3 -> gap -> dense 5 -> channel_shuffle 5", "channel_shuffle needs C×H×W input, got 5"),
    ("conv 6 3x3 -> stochastic_depth 1.0", "rate"),
    ("a, b, c, d = conv 6 3x3 -> split 4", "split 4 of 6 channels: 4 does not divide 6"),
    ("a = conv 6 3x3 -> split 2", "`split` gives 2 tensors; name each of them"),
    ("a, b, c = conv 6 3x3 -> split 2", "`split` gives 2 tensors; name each of them"),
    ("a, b = conv 6 3x3", "2 names for one tensor: only a layer with several outputs (`split`)"),
    ("a, b = conv 6 3x3 -> split 2 -> relu", "`split` gives 2 tensors; name each of them"),
    ("a, relu = conv 6 3x3 -> split 2", "`relu` names a layer, block or parameter"),
])
def test_shape_mistakes_are_clear_errors(layers, message, cnn):
    net = cnn(f"network bad\ninput 1x8x8\nlayers:\n    {layers}\n")
    r = run_cli("check", str(net))
    assert r.code != 0
    assert message in r.err, r.err


def test_modern_blocks_example_checks():
    r = run_cli("check", str(EXAMPLES / "modern_blocks.cnn"))
    assert r.code == 0, r.err
