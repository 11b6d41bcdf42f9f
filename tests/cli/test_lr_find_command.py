"""`cnnc lr-find`: the printed suggestion is the one in lr_find.json, the curve files agree with
each other, the figure is a PNG (or a hint without matplotlib), the checkpoint it starts from is
untouched, and bad ranges or files are one-line errors."""

from __future__ import annotations

import csv
import json
import re
import sys

import numpy as np
import pytest

from conftest import make_data, run_cli, tiny_net

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lrfind-cli")
    net = tmp / "tiny.cnn"
    net.write_text(tiny_net())
    return net, make_data(tmp / "data.npz", n=64), tmp


def test_prints_the_suggestion_and_writes_the_curve(setup):
    net, data, tmp = setup
    out = tmp / "lf"
    r = run_cli("lr-find", str(net), "--data", str(data), "--steps", "40", "--start", "1e-5", "-o", str(out), "-q")
    assert r.code == 0, r.err
    found = json.loads((out / "lr_find.json").read_text())
    printed = float(re.search(r"suggested learning rate: (\S+)", r.out).group(1))
    assert printed == pytest.approx(found["suggested_lr"], rel=5e-3)  # printed to 3 digits
    assert 1e-5 <= found["suggested_lr"] <= 10 and found["steps"] == 40
    with open(out / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == found["steps_run"] == len(found["lr"])
    assert [float(row["lr"]) for row in rows] == found["lr"]
    assert [float(row["smoothed"]) for row in rows] == found["smoothed"]
    assert (out / "lr_find.png").read_bytes()[:8] == PNG
    assert f"plot: {out / 'lr_find.png'}" in r.err


def test_json_output_and_no_matplotlib_gives_the_numbers_and_a_hint(setup, monkeypatch):
    net, data, tmp = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` then raises ImportError
    out = tmp / "lf-noplot"
    r = run_cli("lr-find", str(net), "--data", str(data), "--steps", "12", "-o", str(out), "--json", "-q")
    assert r.code == 0, r.err
    assert json.loads(r.out) == json.loads((out / "lr_find.json").read_text())
    assert "pip install 'cnnc[plot]'" in r.err and not (out / "lr_find.png").exists()


def test_a_run_checkpoint_is_read_not_written(setup):
    net, data, tmp = setup
    run = tmp / "run"
    assert run_cli("train", str(net), "--data", str(data), "--epochs", "1", "-o", str(run), "-q").code == 0
    before = (run / "checkpoint.npz").read_bytes()
    r = run_cli("lr-find", "--resume", str(run), "--steps", "10", "-o", str(tmp / "lf-run"), "-q")
    assert r.code == 0, r.err
    assert (run / "checkpoint.npz").read_bytes() == before


@pytest.mark.parametrize("args, fragment", [
    (["--start", "0"], "0 < start < end"),
    (["--start", "1", "--end", "0.1"], "0 < start < end"),
    (["--steps", "1"], "2 steps or more"),
    (["--optimizer", "nope"], "--optimizer"),
    (["--optimizer", "rprop", "--batch", "64"], "rprop takes `lr` only as its first step size"),
])
def test_bad_ranges_and_settings_are_one_line_errors(setup, args, fragment):
    net, data, tmp = setup
    r = run_cli("lr-find", str(net), "--data", str(data), "-o", str(tmp / "bad"), "-q", *args)
    assert r.code == 1 and fragment in r.err and "Traceback" not in r.err, r.err


def test_a_missing_file_is_named(tmp_path):
    r = run_cli("lr-find", str(tmp_path / "none.cnn"), "-q")
    assert r.code == 1 and "none.cnn" in r.err and "Traceback" not in r.err
