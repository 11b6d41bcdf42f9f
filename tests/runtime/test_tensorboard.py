"""TensorBoard event files of `cnnc train --tensorboard` (runtime/tensorboard.py), read back with
TensorBoard's own reader (EventAccumulator): the scalars equal metrics.jsonl's figures at the
optimizer steps they belong to, a resumed run adds its epochs without repeating a step, and a
missing tensorboardX is an error with the pip hint before anything is written."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import make_data, run_cli, tiny_net

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def setup(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(tiny_net(epochs=3))
    return net, make_data(tmp_path / "data.npz", n=80), tmp_path  # 64 train images: 4 steps an epoch


def test_event_files_hold_the_metrics_per_step_and_epoch(setup):
    net, data, tmp = setup
    run = tmp / "run"
    r = run_cli("train", str(net), "--data", str(data), "-o", str(run), "--tensorboard")
    assert r.code == 0, r.err
    assert list(run.glob("events.out.tfevents.*"))
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = _read(run)
    steps_per_epoch = 4
    assert [s for s, _ in scalars["train/step_loss"]] == list(range(1, 3 * steps_per_epoch + 1))
    assert [s for s, _ in scalars["lr"]] == list(range(1, 3 * steps_per_epoch + 1))
    for tag, key in [("train/loss", "train_loss"), ("train/accuracy", "train_accuracy"), ("test/loss", "test_loss"),
                     ("test/accuracy", "test_accuracy"), ("time/epoch_seconds", "seconds")]:
        got = scalars[tag]
        assert [s for s, _ in got] == [h["epoch"] * steps_per_epoch for h in history], tag
        assert [v for _, v in got] == pytest.approx([h[key] for h in history], rel=1e-6), tag  # stored as float32
    # the epoch's mean train loss is the mean of its steps' losses (equal batches of 16)
    first = [v for s, v in scalars["train/step_loss"] if s <= steps_per_epoch]
    assert sum(first) / len(first) == pytest.approx(history[0]["train_loss"], rel=1e-5)
    assert [v for _, v in scalars["time/step_ms"]] == pytest.approx(
        [1000 * h["seconds"] / steps_per_epoch for h in history], rel=1e-5)
    # the plateau policy keeps lr 0.05 until the validation loss stalls: the logged rates are those used
    assert scalars["lr"][0][1] == pytest.approx(0.05)


def test_resumed_run_appends_without_repeating_a_step(setup):
    net, data, tmp = setup
    run = tmp / "run"
    assert run_cli("train", str(net), "--data", str(data), "-o", str(run), "--tensorboard", "--epochs", "2").code == 0
    r = run_cli("train", "--resume", str(run), "--tensorboard", "--epochs", "3")
    assert r.code == 0, r.err
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # one a session, even within one second
    scalars = _read(run)
    assert [s for s, _ in scalars["train/step_loss"]] == list(range(1, 13))
    assert [s for s, _ in scalars["test/loss"]] == [4, 8, 12]


def test_train_setting_asks_for_event_files_too(setup):
    net, data, tmp = setup
    net.write_text(net.read_text() + "    tensorboard\n")
    run = tmp / "run"
    assert run_cli("train", str(net), "--data", str(data), "-o", str(run), "--epochs", "1").code == 0
    assert [s for s, _ in _read(run)["test/accuracy"]] == [4]


def test_missing_tensorboardx_is_an_error_with_the_pip_hint(setup, monkeypatch):
    net, data, tmp = setup
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what `import tensorboardX` meets where it is absent
    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp / "run"), "--tensorboard")
    assert r.code == 1 and "tensorboardX, which is not installed" in r.err
    assert "hint: pip install 'cnnc[tensorboard]'" in r.err and "Traceback" not in r.err
    assert not (tmp / "run").exists()
