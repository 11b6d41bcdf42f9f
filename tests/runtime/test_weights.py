"""PyTorch state dicts in and out (runtime/weights.py, `cnnc weights`): torchvision-structured
ResNet-18 and DenseNet-121 (tests/torchvision_twins.py) get random weights and BatchNorm
statistics in torch, are saved with `safetensors.torch.save_file` and imported with `cnnc weights
import`: our outputs must equal PyTorch's. Exported back with `cnnc weights export`,
`load_state_dict(strict=True)` must take the file and give PyTorch's outputs again."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from safetensors.torch import load_file, save_file

import cnnc
from cnnc.dsl.errors import CnncError
from cnnc.runtime import api
from cnnc.runtime.weights import export_state, import_state

from conftest import EXAMPLES, run_cli
from torchvision_twins import TWINS, randomised

RTOL = 1e-5


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_state_dict_in_and_out(name, tmp_path):
    twin = randomised(TWINS[name]())
    save_file(twin.state_dict(), tmp_path / "state.safetensors")
    x = np.random.default_rng(1).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()

    r = run_cli("weights", "import", str(EXAMPLES / f"{name}.cnn"), str(tmp_path / "state.safetensors"),
                    "-o", str(tmp_path / "weights.npz"))
    assert r.code == 0, r.err
    rows = {line.split()[0]: line.split()[-2] for line in r.out.splitlines()[1:-1]}
    assert len(rows) == {"resnet18": 41, "densenet121": 242}[name]
    assert "ignored" in r.out and "num_batches_tracked" in r.out
    assert "ambiguous" not in r.err  # no BatchNorm fits another conv's place
    if name == "resnet18":  # our shortcut is written first, torchvision registers it last
        assert rows["layer2.0.downsample.0"] == "stage1.basic_down1.conv1"
        assert rows["layer2.0.conv1"] == "stage1.basic_down1.conv2"
    model = cnnc.load(EXAMPLES / f"{name}.cnn")
    model.load_weights(tmp_path / "weights.npz")
    ours = model(x)
    assert rel(ours, ref) <= RTOL

    r = run_cli("weights", "export", str(EXAMPLES / f"{name}.cnn"), "--checkpoint", str(tmp_path / "weights.npz"),
                    "-o", str(tmp_path / "out.safetensors"), "-q")
    assert r.code == 0, r.err
    exported = load_file(tmp_path / "out.safetensors")
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    back = TWINS[name]()
    back.load_state_dict(exported, strict=True)
    with torch.no_grad():
        again = back.eval()(torch.from_numpy(x)).numpy()
    assert rel(again, ref) <= RTOL


def test_export_like_a_reference_and_fine_tune_from_weights(tmp_path):
    """--like takes a reference state dict's names; `cnnc train --weights` starts from a weights file."""
    twin = randomised(TWINS["resnet18"]())
    state = {k: v for k, v in twin.state_dict().items()}
    save_file(state, tmp_path / "ref.safetensors")
    import_state(EXAMPLES / "resnet18.cnn", tmp_path / "ref.safetensors", tmp_path / "w.npz")
    export_state(EXAMPLES / "resnet18.cnn", tmp_path / "w.npz", tmp_path / "like.safetensors",
                 like=tmp_path / "ref.safetensors")
    back = load_file(tmp_path / "like.safetensors")
    assert list(sorted(back)) == list(sorted(state))
    assert all(torch.equal(back[k], state[k]) for k in state)

    lenet = cnnc.load(EXAMPLES / "lenet5.cnn", seed=5)
    lenet.save(tmp_path / "lenet.npz")
    trainer, notes = api.prepare(EXAMPLES / "lenet5.cnn", run_dir=tmp_path / "run", weights=tmp_path / "lenet.npz",
                                 progress=False)
    start = trainer.model.host_params()
    assert all(np.array_equal(start[k], v) for k, v in lenet.host_params().items())
    assert any("starting from the weights" in n for n in notes)


def test_torchvision_names_only_for_the_families_known(tmp_path):
    cnnc.load(EXAMPLES / "lenet5.cnn").save(tmp_path / "lenet.npz")
    with pytest.raises(CnncError, match="torchvision names are known for the ResNet family"):
        export_state(EXAMPLES / "lenet5.cnn", tmp_path / "lenet.npz", tmp_path / "x.safetensors", names="torchvision")
    _, used = export_state(EXAMPLES / "lenet5.cnn", tmp_path / "lenet.npz", tmp_path / "x.safetensors")
    assert used == "cnnc names"
    assert sorted(load_file(tmp_path / "x.safetensors")) == sorted(cnnc.load(EXAMPLES / "lenet5.cnn").params)


class TinyBlock(nn.Module):
    """torchvision's Bottleneck naming on 8 channels: conv2 and downsample.0 are both 16×8×1×1, and a
    bare parameter (ConvNeXt's `layer_scale`) scales the main path."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.layer_scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) * self.layer_scale
        return torch.relu(y + self.downsample(x))


TINY = """
network tiny
input 8x6x6
default conv bias=false

block unit():
{body}

layers:
    unit() -> gap
"""
SHORTCUT_FIRST = """    short = in -> conv 16 1x1 -> bn
    in -> conv 8 3x3 pad=1 -> bn -> relu -> conv 16 1x1 -> bn -> layer_scale -> add(short) -> relu"""
SHORTCUT_LAST = """    y = conv 8 3x3 pad=1 -> bn -> relu -> conv 16 1x1 -> bn -> layer_scale
    in -> conv 16 1x1 -> bn -> add(y) -> relu"""


@pytest.mark.parametrize("body, ambiguous", [(SHORTCUT_FIRST, False), (SHORTCUT_LAST, True)])
def test_equal_shapes_in_a_block_are_told_apart_or_said_ambiguous(body, ambiguous, cnn, tmp_path):
    """Written shortcut first, only downsample.0 may take the first 16×8×1×1 conv (conv2 waits for
    conv1); written last, either may, and the note says so; the nearer by name is the right one here."""
    twin = randomised(TinyBlock())
    save_file(twin.state_dict(), tmp_path / "tiny.safetensors")
    path = cnn(TINY.format(body=body))
    r = run_cli("weights", "import", str(path), str(tmp_path / "tiny.safetensors"), "-o", str(tmp_path / "w.npz"))
    assert r.code == 0, r.err
    assert ("note: ambiguous: our layer `unit1.conv2` fits their `conv2` and `downsample.0` alike" in r.err) == ambiguous
    assert re.search(r"^layer_scale +parameter +weight 16×1×1 +unit1.layer_scale1 \(layer_scale\)$", r.out, re.M)
    x = np.random.default_rng(2).normal(size=(2, 8, 6, 6)).astype(np.float32)
    model = cnnc.load(path)
    model.load_weights(tmp_path / "w.npz")
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).mean((2, 3), keepdim=True).numpy()
    assert rel(model(x), ref.reshape(model(x).shape)) <= RTOL
    r = run_cli("weights", "export", str(path), "--checkpoint", str(tmp_path / "w.npz"), "--like",
                str(tmp_path / "tiny.safetensors"), "-o", str(tmp_path / "out.safetensors"), "-q")
    assert r.code == 0, r.err
    back = TinyBlock()
    back.load_state_dict(load_file(tmp_path / "out.safetensors"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), twin.state_dict().values()))
