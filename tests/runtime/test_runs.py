"""Run directories and checkpoints under damage: every damaged file is refused naming the file and
the field, a full disk says what could not be written and keeps the previous checkpoint, a killed
run leaves nothing behind that a later one trips over, and resumed metrics never repeat an epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cnnc.runtime import api
from cnnc.runtime.checkpoint import read_npz, write_npz

from conftest import EXAMPLES, REPO, make_data, run_cli, tiny_net

NET = tiny_net()


@pytest.fixture
def trained(tmp_path):
    """A run of 2 epochs: (net path, data path, run dir)."""
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    data = make_data(tmp_path / "data.npz", n=64)
    run = tmp_path / "run"
    api.train(net, data=str(data), run_dir=run, progress=False)
    return net, data, run


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not strict JSON")
    return json.loads(text, parse_constant=refuse)


def damage(run, edit_meta=None, edit_arrays=None):
    arrays, meta = read_npz(run / "checkpoint.npz")
    if edit_arrays:
        edit_arrays(arrays)
    if edit_meta:
        meta = edit_meta(meta)
    if isinstance(meta, dict):
        write_npz(run / "checkpoint.npz", arrays, meta)
    else:  # a list or a string: write it by hand, as a tampering tool would
        payload = dict(arrays)
        payload["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        np.savez(run / "checkpoint.npz", **payload)


def resume_fails(run, *fragments):
    r = run_cli("train", "--resume", str(run), "--epochs", "2", "-q")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    assert str(run / "checkpoint.npz") in r.err or str(run / "run.json") in r.err, r.err
    for f in fragments:
        assert f in r.err, r.err
    return r


# ---- damaged checkpoints ----------------------------------------------------------------------

def test_a_npy_file_given_as_checkpoint(trained, tmp_path):
    net, _, _ = trained
    np.save(tmp_path / "w.npy", np.zeros(3))
    r = run_cli("eval", str(net), "--checkpoint", str(tmp_path / "w.npy"))
    assert r.code == 1 and "single .npy array" in r.err


def test_metadata_that_is_a_json_list(trained):
    _, _, run = trained
    damage(run, edit_meta=lambda m: [m])
    resume_fails(run, "metadata is a JSON list")


@pytest.mark.parametrize("key", ["schedule", "epoch", "cursor", "dropout_rng", "history", "partial"])
def test_missing_metadata_fields(trained, key):
    _, _, run = trained
    damage(run, edit_meta=lambda m: {k: v for k, v in m.items() if k != key})
    resume_fails(run, f"field `{key}`")


def test_a_cursor_far_past_the_epoch(trained):
    _, _, run = trained
    damage(run, edit_meta=lambda m: {**m, "cursor": 10**12})
    resume_fails(run, "cursor 1000000000000 is past the")


def test_step_that_does_not_follow_from_the_position(trained):
    _, _, run = trained
    damage(run, edit_meta=lambda m: {**m, "step": m["step"] + 7})
    resume_fails(run, "does not follow from epoch")


def test_tampered_optimizer_state(trained):
    _, _, run = trained

    def shrink(arrays):
        key = next(k for k in arrays if k.startswith("optim/"))
        arrays[key] = arrays[key].reshape(-1)[:1]
    damage(run, edit_arrays=shrink)
    resume_fails(run, "optimizer state does not fit")


def test_missing_optimizer_state_is_refused_not_reset(trained):
    _, _, run = trained
    damage(run, edit_arrays=lambda a: [a.pop(k) for k in [k for k in a if k.startswith("optim/")]])
    resume_fails(run, "optimizer state lacks")


def test_missing_optimizer_state_of_an_older_checkpoint(trained):
    _, _, run = trained  # no optim_keys in the metadata, as before they were written
    damage(run, edit_meta=lambda m: {k: v for k, v in m.items() if k != "optim_keys"},
           edit_arrays=lambda a: [a.pop(k) for k in [k for k in a if k.startswith("optim/")]])
    resume_fails(run, "optimizer state lacks everything momentum keeps")


@pytest.mark.parametrize("dtype, fragment", [("U8", "<U8 values, not real numbers"),
                                             (np.complex64, "complex64 values"),
                                             (np.int32, "holds integers")])
def test_parameters_of_the_wrong_kind(trained, dtype, fragment):
    net, _, run = trained

    def retype(arrays):
        key = next(k for k in arrays if k.startswith("param/") and k.endswith("weight"))
        arrays[key] = arrays[key].astype(dtype)
    damage(run, edit_arrays=retype)
    resume_fails(run, fragment)
    r = run_cli("eval", str(net), "--checkpoint", str(run / "checkpoint.npz"))
    assert r.code == 1 and fragment in r.err


def test_non_finite_parameters(trained):
    _, _, run = trained

    def poison(arrays):
        key = next(k for k in arrays if k.startswith("param/"))
        arrays[key] = arrays[key].copy()
        arrays[key].reshape(-1)[0] = np.nan
    damage(run, edit_arrays=poison)
    resume_fails(run, "not a finite float32")


def test_a_generator_state_out_of_range(trained):
    _, _, run = trained  # found by the fuzz suite: numpy raised OverflowError on a negative state

    def negative(m):
        m["dropout_rng"]["state"]["state"] = -5
        return m
    damage(run, edit_meta=negative)
    resume_fails(run, "field `dropout_rng`", "not a generator state")


def test_metadata_values_of_the_wrong_type(trained):
    _, _, run = trained
    damage(run, edit_meta=lambda m: {**m, "epoch": "two"})
    resume_fails(run, "field `epoch`", "integer")


def test_a_truncated_checkpoint(trained):
    _, _, run = trained
    data = (run / "checkpoint.npz").read_bytes()
    (run / "checkpoint.npz").write_bytes(data[: len(data) // 2])
    resume_fails(run, "not a readable checkpoint")


# ---- run.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, fragment", [
    ("[1, 2]", "holds a JSON list"),
    ('{"config": {}}', "field `cnn`"),
    ('{"cnn": "x.cnn", "config": {"lr": -1}}', "field `config.lr`"),
    ('{"cnn": "x.cnn", "config": {}, "extra": 1}', "field `extra`"),
    ("[" * 100000, "nested too deeply"),
    ('{"cnn": NaN}', "not valid JSON"),
])
def test_damaged_run_json(trained, content, fragment):
    _, _, run = trained
    (run / "run.json").write_text(content)
    resume_fails(run, fragment)


# ---- what is written is strict JSON --------------------------------------------------------------

def test_metadata_and_metrics_are_strict_json(trained):
    _, _, run = trained  # the plateau policy's best-so-far starts at infinity
    arrays, _ = np.load(run / "checkpoint.npz"), None
    meta = strict_json(arrays["meta"].tobytes().decode())
    assert meta["schedule"]["best"] is not None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    strict_json((run / "run.json").read_text())


def test_a_checkpoint_before_the_first_validation_is_strict_json(tmp_path):
    """Interrupted in its first epoch, a plateau schedule has no best loss yet (infinity inside):
    the metadata says null, and resuming reads it back as no best yet."""
    import signal
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    data = make_data(tmp_path / "d.npz", n=64)
    trainer, _ = api.prepare(net, data=str(data), run_dir=tmp_path / "r", progress=False)
    step = trainer.optimizer.step

    def step_then_ctrl_c(grads, lr):
        step(grads, lr)
        if trainer.step == 0:
            signal.raise_signal(signal.SIGINT)
    trainer.optimizer.step = step_then_ctrl_c
    assert api.run(trainer).interrupted
    meta = strict_json(np.load(tmp_path / "r" / "checkpoint.npz")["meta"].tobytes().decode())
    assert meta["schedule"]["best"] is None and meta["cursor"] == 1
    assert run_cli("train", "--resume", str(tmp_path / "r"), "-q").code == 0


def test_json_summary_is_strict_even_when_nothing_was_trained(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    data = make_data(tmp_path / "d.npz", n=64)
    run_cli("train", str(net), "--data", str(data), "-o", str(tmp_path / "r"), "-q")
    r = run_cli("train", "--resume", str(tmp_path / "r"), "--json", "-q")  # already done: zero epochs to run
    assert r.code == 0, r.err
    strict_json(r.out)


# ---- stopped and killed runs -----------------------------------------------------------------------

def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    data = make_data(tmp_path / "d.npz", n=64)
    straight = api.train(net, data=str(data), run_dir=tmp_path / "a", progress=False)
    trainer, _ = api.prepare(net, data=str(data), run_dir=tmp_path / "b", progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text(json.dumps(trainer.pending_info))  # as a run killed at once leaves it
    r = run_cli("train", "--resume", str(tmp_path / "b"), "-q", "--json")
    assert r.code == 0, r.err
    assert "starting from the beginning" not in r.out
    a, _ = read_npz(tmp_path / "a" / "checkpoint.npz")
    b, _ = read_npz(tmp_path / "b" / "checkpoint.npz")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert json.loads(r.out)["test_loss"] == straight.test_loss


def test_leftovers_of_a_killed_write_are_removed(trained):
    _, _, run = trained
    stale = [run / ".checkpoint.npz.k1ll3d.tmp", run / ".metrics.jsonl.x9.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    r = run_cli("train", "--resume", str(run), "--epochs", "3", "-q")
    assert r.code == 0, r.err
    assert not any(p.exists() for p in stale)
    assert not list(run.glob(".*.tmp"))


def test_sigkill_during_training_then_resume(tmp_path):
    """A real SIGKILL: the run is killed during its third epoch; what it leaves resumes cleanly and
    the metrics hold each epoch once."""
    net = tmp_path / "tiny.cnn"
    net.write_text(NET.replace("epochs 2", "epochs 40"))
    data = make_data(tmp_path / "d.npz", n=640)
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "cnnc", "train", str(net), "--data", str(data), "-o", str(run), "-q"],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists() or \
            len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.05)
    p.kill()
    p.wait()
    r = run_cli("train", "--resume", str(run), "-q", "--epochs", "40", "--json")
    assert r.code == 0, r.err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 41))
    assert not list(run.glob(".*.tmp"))


def test_metrics_are_rewritten_from_the_checkpoint_on_resume(trained):
    _, _, run = trained
    with open(run / "metrics.jsonl", "a") as f:  # an epoch the checkpoint never recorded
        f.write('{"epoch": 3, "train_loss": 0.1}\n')
    r = run_cli("train", "--resume", str(run), "--epochs", "4", "-q")
    assert r.code == 0, r.err
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_two_processes_cannot_train_in_one_directory(trained):
    from cnnc.runtime.files import RunLock
    _, _, run = trained
    with RunLock(run):
        r = run_cli("train", "--resume", str(run), "--epochs", "3", "-q")
    assert r.code == 1 and "in use by another cnnc process" in r.err


def test_extending_a_cosine_run_is_refused_with_the_reason(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET.replace("policy=plateau patience=1", "policy=cosine"))
    data = make_data(tmp_path / "d.npz", n=64)
    api.train(net, data=str(data), run_dir=tmp_path / "r", epochs=1, progress=False)
    r = run_cli("train", "--resume", str(tmp_path / "r"), "--epochs", "3")
    assert r.code == 1 and "policy cosine" in r.err and "would change the rates" in r.err
    r = run_cli("train", "--resume", str(tmp_path / "r"), "-q")  # the run's own length: fine
    assert r.code == 0, r.err


def test_extending_a_step_run_stays_exact(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET.replace("policy=plateau patience=1", "policy=step step_size=1"))
    data = make_data(tmp_path / "d.npz", n=64)
    api.train(net, data=str(data), run_dir=tmp_path / "a", epochs=3, progress=False)
    api.train(net, data=str(data), run_dir=tmp_path / "b", epochs=1, progress=False)
    assert run_cli("train", "--resume", str(tmp_path / "b"), "--epochs", "3", "-q").code == 0
    a, _ = read_npz(tmp_path / "a" / "checkpoint.npz")
    b, _ = read_npz(tmp_path / "b" / "checkpoint.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["config"]["epochs"] == 3


@pytest.mark.parametrize("file_name", ["...cnn", "....cnn", ".hidden.cnn", "my net.cnn"])
def test_run_directories_stay_under_runs(tmp_path, monkeypatch, file_name):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    net = work / file_name  # the network is named after the file: `..` for the first
    net.write_text(NET.replace("network tiny\n", ""))
    data = make_data(work / "d.npz", n=64)
    r = run_cli("train", str(net), "--data", str(data), "--epochs", "1", "-q", "--json")
    assert r.code == 0, r.err
    run_dir = (work / json.loads(r.out)["run_dir"]).resolve()
    assert run_dir.parent == (work / "runs").resolve()
    assert sorted(p.name for p in work.iterdir()) == sorted(["runs", "d.npz", net.name])


# ---- a full disk ---------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root, as CI has); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory):
    """Fill the filesystem of `directory` to the last byte."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return directory / "filler"


def test_a_full_disk_at_the_checkpoint_keeps_the_previous_one(small_disk, tmp_path):
    """The disk holds one checkpoint of this network (weights and momentum, about 560 KiB) but
    not a second one beside it: the next epoch's checkpoint cannot be written."""
    net = tmp_path / "wide.cnn"
    net.write_text(NET.replace("    conv 4 3x3 pad=1 -> bn -> relu -> maxpool 2x2 -> gap -> dense classes",
                               "    flatten -> dense 1024 -> relu -> dense classes"))
    data = make_data(tmp_path / "d.npz", n=64)
    run = small_disk / "run"
    assert run_cli("train", str(net), "--data", str(data), "-o", str(run), "-q").code == 1
    arrays, meta = read_npz(run / "checkpoint.npz")
    r = run_cli("train", "--resume", str(run), "-q")
    assert r.code == 1 and "Traceback" not in r.err
    assert f"could not write {run / 'checkpoint.npz'}: No space left on device" in r.err
    assert "the previous checkpoint.npz is intact" in r.err
    again, meta_again = read_npz(run / "checkpoint.npz")
    assert meta_again["epoch"] == meta["epoch"] == 1
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    assert not list(run.glob(".*.tmp"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_full_disk_at_run_json(small_disk, tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    data = make_data(tmp_path / "d.npz", n=64)
    fill(small_disk)
    r = run_cli("train", str(net), "--data", str(data), "-o", str(small_disk / "run"), "-q")
    assert r.code == 1 and "Traceback" not in r.err
    assert "No space left on device" in r.err and "could not" in r.err


def test_a_full_disk_at_compile(small_disk):
    fill(small_disk)
    r = run_cli("compile", str(EXAMPLES / "lenet5.cnn"), "-o", str(small_disk / "out"))
    assert r.code == 1 and "Traceback" not in r.err
    assert "No space left on device" in r.err


def test_a_full_device_at_run_output(tmp_path):
    out = tmp_path / "art"
    assert run_cli("compile", str(EXAMPLES / "lenet5.cnn"), "-o", str(out)).code == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 32, 32), np.float32))
    target = tmp_path / "y.npy"
    os.symlink("/dev/full", target)  # writes there fail with ENOSPC, as on a full disk
    r = run_cli("run", str(out), "--input", str(tmp_path / "x.npy"), "-o", str(target))
    assert r.code == 1 and "Traceback" not in r.err
    assert "No space left on device" in r.err or "could not write" in r.err, r.err
