"""`cnnc train --precision`: it overrides the file's `precision`, a wrong value or a backend
without the precision is a one-line error naming the setting, before anything is written."""

from __future__ import annotations

import json

import pytest

from cnnc.runtime.checkpoint import read_npz

from conftest import EXAMPLES, make_data, run_cli

NET = """\
network tiny
input 1x8x8
classes 4
layers:
    conv 4 3x3 pad=1 -> relu -> gap -> dense classes
train:
    batch 32
    epochs 1
    precision fp16
"""


def test_the_flag_overrides_the_files_precision(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    data = make_data(tmp_path / "data.npz")
    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp_path / "run"), "--precision", "bf16", "-q",
                "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["epochs"] == 1
    _, meta = read_npz(tmp_path / "run" / "checkpoint.npz")
    assert meta["config"]["precision"] == "bf16" and "amp" not in meta  # bf16 needs no loss scaling


def test_a_wrong_precision_lists_the_choices(tmp_path):
    r = run_cli("train", str(EXAMPLES / "lenet5.cnn"), "--precision", "fp8", "-o", str(tmp_path / "run"))
    assert r.code == 1 and "Traceback" not in r.err
    assert "--precision" in r.err and all(p in r.err for p in ("fp32", "tf32", "bf16", "fp16"))
    assert not (tmp_path / "run").exists()


def test_cuda_takes_bf16_and_without_a_gpu_says_what_is_missing(tmp_path):
    """The CUDA backend computes in bf16 (its tensor-core kernels); on a machine without CuPy or
    a GPU the run stops with that reason, before writing anything."""
    from cnnc.backends.cuda import device
    if device.gpu_available():
        pytest.skip("a GPU is here: the run would train")
    r = run_cli("train", str(EXAMPLES / "lenet5.cnn"), "--backend", "cuda", "--precision", "bf16",
                "-o", str(tmp_path / "run"))
    assert r.code == 1 and "Traceback" not in r.err
    assert "precision" not in r.err and ("CuPy" in r.err or "GPU" in r.err)
    assert not (tmp_path / "run").exists()
