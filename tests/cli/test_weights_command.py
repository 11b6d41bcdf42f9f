"""`cnnc weights import` refuses, in one located message and exit 1, a state dict of another network
(naming our layer, its line, and their modules that could have come next, with shapes), a file that
is not safetensors, a missing file, and a missing safetensors package."""

from __future__ import annotations

import sys

import pytest
from safetensors.torch import save_file

from conftest import EXAMPLES, run_cli, run_process
from torchvision_twins import ResNet18, randomised


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory):
    path = tmp_path_factory.mktemp("state") / "resnet18.safetensors"
    save_file(randomised(ResNet18(classes=10)).state_dict(), path)
    return path


def test_another_network_is_refused_naming_both_sides(resnet18_state, tmp_path):
    r = run_process("weights", "import", str(EXAMPLES / "resnet34.cnn"), str(resnet18_state), "-o", str(tmp_path / "w.npz"))
    assert r.code == 1 and "Traceback" not in r.err
    file, line, _col, msg = r.first_error()
    assert file.endswith("resnet34.cnn") and line == 11  # the first conv of `basic`, the third block of stage 1
    assert "our layer `basic3.conv1` (conv, weight 64×64×3×3) has no counterpart" in msg
    assert "after `basic2.bn2` ↔ `layer1.1.bn2`" in msg
    assert "`layer2.0.conv1` (conv, weight 128×64×3×3)" in msg
    assert not (tmp_path / "w.npz").exists()


def test_another_class_count_is_refused_at_the_classifier(resnet18_state):
    r = run_cli("weights", "import", str(EXAMPLES / "resnet18.cnn"), str(resnet18_state), "-q")
    assert r.code == 1
    _file, line, _col, msg = r.first_error()
    assert line == 25
    assert "our layer `dense1` (dense, weight 1000×512; bias 1000)" in msg
    assert "`fc` (linear, bias 10; weight 10×512)" in msg


def test_not_safetensors_and_missing(tmp_path):
    (tmp_path / "state.safetensors").write_bytes(b"PK\x03\x04 not a state dict")
    r = run_cli("weights", "import", str(EXAMPLES / "lenet5.cnn"), str(tmp_path / "state.safetensors"))
    assert r.code == 1 and "is not a safetensors file" in r.err and "save_file" in r.err
    r = run_cli("weights", "import", str(EXAMPLES / "lenet5.cnn"), str(tmp_path / "none.safetensors"))
    assert r.code == 1 and "state dict not found" in r.err
    r = run_cli("weights", "export", str(EXAMPLES / "lenet5.cnn"), "--checkpoint", str(tmp_path / "none.npz"),
                "-o", str(tmp_path / "x.safetensors"))
    assert r.code == 1 and "checkpoint not found" in r.err


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # what Python does when it is not installed
    r = run_cli("weights", "import", str(EXAMPLES / "lenet5.cnn"), str(tmp_path / "state.safetensors"))
    assert r.code == 1 and "pip install 'cnnc[safetensors]'" in r.err
