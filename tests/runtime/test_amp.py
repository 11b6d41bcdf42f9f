"""Reduced-precision training: the fp16 loss scaler follows torch.amp.GradScaler step for step, an
fp16 run that overflows skips its steps and backs off, and resumes bit for bit with its scale;
LeNet-5 in bf16 learns as in float32."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.runtime import api
from cnnc.runtime.amp import GradScaler, scaler_for
from cnnc.runtime.checkpoint import read_npz

from conftest import EXAMPLES, make_data

torch = pytest.importorskip("torch")

NET = """\
network tiny
input 1x8x8
classes 4
layers:
    conv 6 3x3 pad=1 -> bn -> relu -> maxpool 2x2
    conv 8 3x3 pad=1 -> relu -> gap -> dense classes
train:
    optimizer momentum momentum=0.9
    lr 0.05
    batch 16
    epochs 4
    seed 3
"""


@pytest.fixture
def setup(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    return net, make_data(tmp_path / "data.npz"), tmp_path


def test_defaults_are_torchs():
    theirs = torch.amp.GradScaler("cpu")
    ours = GradScaler()
    assert float(ours.scale) == theirs.get_scale() == 2.0 ** 16
    assert (float(ours.growth_factor), float(ours.backoff_factor), ours.growth_interval) == (
        theirs.get_growth_factor(), theirs.get_backoff_factor(), theirs.get_growth_interval())
    assert scaler_for("fp16") is not None and scaler_for("bf16") is None and scaler_for("fp32") is None


def test_scale_sequence_and_updates_equal_torch_gradscaler_on_scripted_gradients():
    """Finite gradients, an inf, a NaN, several overflows in a row, and runs of good steps long
    enough to grow the scale (growth interval 3): the scale after every step, whether the step
    was taken, and the parameters SGD reaches from the unscaled gradients, all as PyTorch's."""
    script = "ffffi fffn iiffff fffff fi ffff".replace(" ", "")
    rng = np.random.default_rng(0)
    p = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([p], lr=0.5)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    ours = GradScaler(init_scale=2.0 ** 10, growth_interval=3)
    mine = np.zeros(5, np.float32)
    for kind in script:
        c = rng.standard_normal(5).astype(np.float32)  # d loss / d p before scaling
        if kind != "f":
            c[rng.integers(5)] = np.inf if kind == "i" else np.nan
        opt.zero_grad()
        theirs.scale((p * torch.from_numpy(c)).sum()).backward()
        theirs.step(opt)
        theirs.update()
        unscaled, finite = ours.unscale({"p": ours.scaled(c)})
        ours.update(finite)
        if finite:
            mine = mine - np.float32(0.5) * unscaled["p"]
        assert float(ours.scale) == theirs.get_scale(), kind
        assert np.array_equal(mine, p.detach().numpy())
    assert ours.skipped == script.count("i") + script.count("n")
    assert theirs.get_scale() != 2.0 ** 10  # the script moved the scale


def _fp16_run(net, data, run_dir, epochs, resume=False, start_scale=None):
    trainer, _ = api.prepare(None if resume else net, data=None if resume else str(data), run_dir=run_dir,
                             resume=run_dir if resume else None, epochs=epochs, precision=None if resume else "fp16",
                             progress=False)
    if start_scale is not None:  # so large that the first backward passes overflow fp16
        trainer.scaler.scale = np.float32(start_scale)
    return api.run(trainer), trainer


def test_fp16_overflow_skips_steps_backs_off_and_resumes_bit_for_bit(setup):
    net, data, tmp = setup
    straight, t = _fp16_run(net, data, tmp / "a", 3, start_scale=2.0 ** 22)
    assert t.scaler.skipped > 0 and float(t.scaler.scale) < 2.0 ** 22  # overflowed, backed off
    assert straight.train_accuracy > 0.5  # and learned once the scale fitted fp16
    _fp16_run(net, data, tmp / "b", 2, start_scale=2.0 ** 22)
    resumed, r = _fp16_run(net, data, tmp / "b", 3, resume=True)
    a, meta_a = read_npz(tmp / "a" / "checkpoint.npz")
    b, meta_b = read_npz(tmp / "b" / "checkpoint.npz")
    assert meta_a["amp"] == meta_b["amp"] and meta_a["config"]["precision"] == "fp16"
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert straight.test_loss == resumed.test_loss


def test_lenet5_in_bf16_learns_as_float32_does_and_differs_from_it(tmp_path):
    """One epoch of LeNet-5's recipe on MNIST-5k (the 15-epoch figures are in benchmarks/NOTES.md):
    the bf16 run's test accuracy within a point of float32's, from float32 master weights that
    the rounding has moved off float32's path."""
    runs = {p: api.train(EXAMPLES / "lenet5.cnn", run_dir=tmp_path / p, epochs=1, precision=p, progress=False)
            for p in ("fp32", "bf16")}
    assert runs["fp32"].test_accuracy > 0.85
    assert abs(runs["bf16"].test_accuracy - runs["fp32"].test_accuracy) <= 0.01
    w32, _ = read_npz(tmp_path / "fp32" / "checkpoint.npz")
    w16, meta = read_npz(tmp_path / "bf16" / "checkpoint.npz")
    assert meta["config"]["precision"] == "bf16" and "amp" not in meta
    assert all(w16[k].dtype == np.float32 for k in w16)  # float32 master weights
    assert any(not np.array_equal(w32[k], w16[k]) for k in w32 if k.startswith("param/"))
