"""The two kinds of failure: a user mistake is a clear error with exit 1 (or argparse's exit 2 for
a bad flag), a bug in cnnc is "internal error, please report" with the traceback and exit 70.
Damaged artifacts and bad flag values are user mistakes."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from cnnc.cli import main

from conftest import EXAMPLES, run_cli, run_process


@pytest.mark.parametrize("command", ["compile", "check", "bench", "parity"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_batch_must_be_positive(command, value):
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(err):
        main([command, str(EXAMPLES / "lenet5.cnn"), "--batch", value])
    assert exc.value.code == 2
    err = err.getvalue()
    assert "--batch" in err and ("must be 1 or more" in err or "whole number" in err)


def test_a_bug_is_reported_as_an_internal_error(monkeypatch):
    """A failure that is no user mistake (here an invariant broken on purpose) says so."""
    import cnnc.compiler.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("an invariant broke")
    monkeypatch.setattr(pipeline, "check", broken)
    r = run_cli("check", str(EXAMPLES / "lenet5.cnn"))
    assert r.code == 70
    assert r.err.startswith("internal error in cnnc")
    assert "please report" in r.err and "RuntimeError: an invariant broke" in r.err and "Traceback" in r.err


def test_user_errors_exit_1_from_a_shell(tmp_path):
    r = run_process("check", str(tmp_path / "missing.cnn"))
    assert r.code == 1 and "no such file" in r.err and "Traceback" not in r.err


@pytest.fixture
def artifact(tmp_path):
    out = tmp_path / "art"
    assert run_cli("compile", str(EXAMPLES / "lenet5.cnn"), "-o", str(out)).code == 0
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 32, 32), np.float32))
    return out, tmp_path / "x.npy"


def edit_plan(out, edit):
    plan = json.loads((out / "plan.json").read_text())
    edit(plan)
    (out / "plan.json").write_text(json.dumps(plan))


def run_fails(out, x, *fragments):
    r = run_cli("run", str(out), "--input", str(x))
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    for f in fragments:
        assert f in r.err, r.err
    return r


def test_a_plan_nested_100000_deep(artifact):
    out, x = artifact
    (out / "plan.json").write_text("[" * 100_000 + "]" * 100_000)
    run_fails(out, x, "plan.json", "nested too deeply")


@pytest.mark.parametrize("edit, fragment", [
    (lambda p: p["nodes"][3].update(op="teleport"), "unknown op"),
    (lambda p: p["nodes"][2].update(inputs=[5]), "are not earlier nodes"),
    (lambda p: p["nodes"][2].update(inputs=[2]), "are not earlier nodes"),
    (lambda p: p["nodes"][2].update(shape=[6, 1, -4]), "positive integers"),
    (lambda p: p["nodes"][2].update(shape=[6, 5, 5]), "does not follow from its inputs"),
    (lambda p: p["nodes"][1].update(attrs={"filters": "many"}), "corrupt"),
    (lambda p: p["nodes"][1]["attrs"].update(stride=[0, 0]), "corrupt"),
    (lambda p: p.update(nodes=[]), "not a list of nodes"),
    (lambda p: p.update(output=999), "input or output node missing"),
    (lambda p: p.update(nodes="x"), "not a list of nodes"),
])
def test_damaged_plans(artifact, edit, fragment):
    out, x = artifact
    edit_plan(out, edit)
    run_fails(out, x, fragment)


def test_weights_that_do_not_fit_the_plan(artifact):
    out, x = artifact
    from cnnc.runtime.checkpoint import read_npz, write_npz
    arrays, meta = read_npz(out / "weights.npz")
    key = next(iter(arrays))
    arrays[key] = arrays[key].astype(np.complex64)
    write_npz(out / "weights.npz", arrays, meta)
    run_fails(out, x, "complex64")


@pytest.mark.parametrize("content, fragment", [
    (np.zeros((1, 1, 32, 32), np.complex64), "complex64 values"),
    (np.full((1, 1, 32, 32), np.inf, np.float32), "not finite"),
    (np.zeros((1, 3, 32, 32), np.float32), "items of shape (3, 32, 32)"),
    (np.zeros((0, 1, 32, 32), np.float32), "no items"),
])
def test_bad_inputs_to_run(artifact, tmp_path, content, fragment):
    out, _ = artifact
    np.save(tmp_path / "bad.npy", content)
    run_fails(out, tmp_path / "bad.npy", fragment)


def test_an_object_array_input_is_not_unpickled(artifact, tmp_path):
    out, _ = artifact
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    run_fails(out, tmp_path / "obj.npy", "cannot read")
