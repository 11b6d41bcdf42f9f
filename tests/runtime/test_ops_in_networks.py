"""Every element-wise op of the table in a small network: it checks, trains a few steps, and
compiles at -O2 with the fusion its pattern allows (conv + bn + activation → one fused conv at
inference; conv + activation in the training plan), and the compiled artifact runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnc.backends.numpy import NumpyBackend
from cnnc.compiler.ops import OPS
from cnnc.compiler.pipeline import PassContext, check, optimize

from conftest import make_data, run_cli

ELEMENTWISE = [op for op in OPS if OPS[op].formula is not None and OPS[op].user]

NET = """\
network with_{op}
input 1x8x8
classes 4
layers:
    conv 6 3x3 pad=1 -> bn -> {op} -> maxpool 2x2
    conv 6 3x3 pad=1 -> {op} -> gap -> dense classes
train:
    optimizer momentum momentum=0.9
    lr 0.05
    batch 16
    epochs 1
    seed 1
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data") / "data.npz", n=48)


@pytest.mark.parametrize("op", ELEMENTWISE)
def test_a_network_using_it_checks_trains_and_compiles_fused(op, data, tmp_path):
    net = tmp_path / f"{op}.cnn"
    net.write_text(NET.format(op=op))
    assert run_cli("check", str(net)).code == 0

    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp_path / "run"), "-q", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert np.isfinite(summary["train_loss"]) and summary["train_loss"] < summary["initial_loss"] * 1.5, summary
    assert (tmp_path / "run" / "checkpoint.npz").exists()

    r = run_cli("compile", str(net), "-O2", "--report", "-o", str(tmp_path / "art"))
    assert r.code == 0, r.err
    assert f"conv + bn + {op} → fused conv_bn_{op}" in r.out  # inference: BatchNorm folded, activation fused
    assert f"conv + {op} → fused conv_{op}" in r.out
    assert "refused:" not in r.out and " 0 refused" in r.out, r.out
    trained = optimize(check(net), NumpyBackend.configure(PassContext(mode="training")))
    fused = [d["attrs"] for _, d in trained.nodes(data=True) if d["op"] == "fused_conv"]
    assert [a.activation for a in fused] == [op], "training: the conv without BatchNorm fuses its activation"

    x = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = run_cli("run", str(tmp_path / "art"), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.code == 0, r.err
    assert np.isfinite(np.load(tmp_path / "y.npy")).all()
