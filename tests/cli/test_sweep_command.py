"""`cnnc train --sweep`: one run per combination in its own directory with its own settings, the
same metrics in parallel processes as one after the other, a diverging run reported while the
others go on, the table equal to the runs' metrics, and every bad key or value refused naming it."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import make_data, run_cli, tiny_net

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    net = tmp / "tiny.cnn"
    net.write_text(tiny_net(lr="0.05", epochs=1))
    return net, make_data(tmp / "data.npz", n=48), tmp


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_time(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def sequential(setup):
    net, data, tmp = setup
    root = tmp / "seq"
    r = run_cli("train", str(net), "--data", str(data), "--sweep", "lr=0.05,0.01", "--sweep", "batch=16",
                "-o", str(root), "-q")
    return r, root


def test_one_run_per_combination_with_its_settings(sequential):
    r, root = sequential
    assert r.code == 0, r.err
    names = ["lr=0.05,batch=16", "lr=0.01,batch=16"]
    for name in names:
        config = json.loads((root / name / "run.json").read_text())["config"]
        lr, batch = (part.split("=")[1] for part in name.split(","))
        assert (config["lr"], config["batch"]) == (float(lr), int(batch))
        assert len(metrics(root / name)) == 1
    summary = json.loads((root / "sweep.json").read_text())
    assert [run["name"] for run in summary["runs"]] == names
    assert (root / "sweep.png").read_bytes()[:8] == PNG
    # the table's figures are the runs' last epochs
    for name in names:
        last = metrics(root / name)[-1]
        row = next(line for line in r.out.splitlines() if line.startswith(name + " "))
        assert f"{100 * last['test_accuracy']:.2f}%" in row and f"{last['test_loss']:.4f}" in row


def test_parallel_processes_give_the_same_runs_and_a_diverging_rate_is_reported(setup, sequential):
    net, data, tmp = setup
    _, seq = sequential
    root = tmp / "par"
    r = run_cli("train", str(net), "--data", str(data), "--sweep", "lr=1e6,0.01", "--batch", "16",
                "--jobs", "2", "-o", str(root), "-q")
    assert r.code == 0, r.err  # a diverging run is a finding of the sweep, not its failure
    assert without_time(metrics(root / "lr=0.01")) == without_time(metrics(seq / "lr=0.01,batch=16"))
    row = next(line for line in r.out.splitlines() if line.startswith("lr=1e6 "))
    assert "failed: training stopped: the loss" in row
    assert [run["status"] for run in json.loads((root / "sweep.json").read_text())["runs"]][0].startswith("failed")


@pytest.mark.parametrize("args, fragments", [
    (["--sweep", "lrate=0.1,0.01"], ["`lrate` is not a train setting", "lr", "batch", "momentum", "did you mean"]),
    (["--sweep", "lr=0.1,abc"], ["--sweep lr=abc", "number"]),
    (["--sweep", "lr=0.1,-1"], ["--sweep lr=-1", "greater than 0"]),
    (["--sweep", "optimizer=sgd,lion"], ["--sweep optimizer=lion"]),
    (["--sweep", "lr=0.1,,0.2"], ["empty value"]),
    (["--sweep", "lr"], ["KEY=V1,V2"]),
    (["--sweep", "lr=0.1", "--sweep", "lr=0.2"], ["given twice"]),
    (["--sweep", "lr=0.1,0.2", "--lr", "0.3"], ["--sweep lr and --lr"]),
    (["--sweep", "data=../x"], ["a sweep value is a number or a word"]),
    (["--jobs", "2"], ["give --sweep"]),
])
def test_bad_keys_and_values_are_refused_before_any_run(setup, args, fragments):
    net, data, tmp = setup
    root = tmp / "bad"
    r = run_cli("train", str(net), "--data", str(data), "-o", str(root), "-q", *args)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    for f in fragments:
        assert f in r.err, (f, r.err)
    assert not root.exists()


def test_resume_is_not_a_sweep(setup):
    net, data, tmp = setup
    r = run_cli("train", "--resume", str(tmp / "seq" / "lr=0.05,batch=16"), "--sweep", "lr=0.1,0.2", "-q")
    assert r.code == 1 and "--resume RUN_DIR/NAME" in r.err


def test_ctrl_c_stops_the_whole_sweep_with_a_checkpoint(setup, monkeypatch):
    from cnnc.runtime.train import Trainer

    net, data, tmp = setup
    root = tmp / "stopped"
    apply = Trainer._apply

    def apply_then_ctrl_c(self, accum, pending):  # a real SIGINT arrives during the first run's first step
        apply(self, accum, pending)
        if self.step == 1:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(Trainer, "_apply", apply_then_ctrl_c)
    r = run_cli("train", str(net), "--data", str(data), "--sweep", "lr=0.05,0.01", "-o", str(root), "-q")
    assert r.code == 130
    statuses = [run["status"] for run in json.loads((root / "sweep.json").read_text())["runs"]]
    assert statuses == ["interrupted", "not started (interrupted)"]
    assert (root / "lr=0.05" / "checkpoint.npz").exists() and not (root / "lr=0.01").exists()
