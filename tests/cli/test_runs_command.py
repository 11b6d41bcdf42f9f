"""`cnnc runs DIR...` (runtime/runs.py): the table is the runs' own metrics.jsonl, the figure is
written (or a hint without matplotlib), and missing or damaged run directories are refused
naming the file, the line and the field."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import make_data, run_cli, tiny_net

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    net = tmp / "tiny.cnn"
    net.write_text(tiny_net(lr="0.05", epochs=2))
    data = make_data(tmp / "data.npz", n=48)
    dirs = [tmp / "a", tmp / "b"]
    for d, lr in zip(dirs, ("0.05", "0.01")):
        assert run_cli("train", str(net), "--data", str(data), "--lr", lr, "-o", str(d), "-q").code == 0
    return tmp, dirs


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_table_json_and_figure_come_from_the_metrics(two_runs):
    tmp, dirs = two_runs
    out = tmp / "both.png"
    r = run_cli("runs", *map(str, dirs), "--plot", str(out))
    assert r.code == 0, r.err
    for d in dirs:
        h = records(d)
        row = next(line for line in r.out.splitlines() if line.startswith(d.name + " "))
        best = max(e["test_accuracy"] for e in h)
        assert row.split()[1:6] == ["2", f"{h[-1]['train_loss']:.4f}", f"{h[-1]['test_loss']:.4f}",
                                    f"{100 * h[-1]['test_accuracy']:.2f}%", f"{100 * best:.2f}%"]
        assert row.split()[6] == f"{sum(e['seconds'] for e in h):.1f}s"
    assert out.read_bytes()[:8] == PNG and f"figure: {out}" in r.err
    j = run_cli("runs", *map(str, dirs), "--json", "--no-plot")
    rows = json.loads(j.out)
    assert [row["history"] for row in rows] == [records(d) for d in dirs]
    assert [row["test_accuracy"] for row in rows] == [records(d)[-1]["test_accuracy"] for d in dirs]


def test_without_matplotlib_the_table_and_a_hint(two_runs, monkeypatch):
    tmp, dirs = two_runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = run_cli("runs", str(dirs[0]), "--plot", str(tmp / "none.png"))
    assert r.code == 0 and dirs[0].name in r.out and "pip install 'cnnc[plot]'" in r.err
    assert not (tmp / "none.png").exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda lines: lines[:1] + ["{not json"], "metrics.jsonl:2 is not valid JSON"),
    (lambda lines: [json.dumps({**json.loads(lines[0]), "test_accuracy": 7})], "metrics.jsonl:1: field `test_accuracy`"),
    (lambda lines: [json.dumps({**json.loads(lines[0]), "epoch": 3})], "metrics.jsonl:1: epoch 3 follows 0 epochs"),
    (lambda lines: ["[1, 2]"], "metrics.jsonl:1 holds a JSON list"),
])
def test_damaged_metrics_are_refused_naming_line_and_field(two_runs, tmp_path, damage, fragment):
    _, dirs = two_runs
    lines = (dirs[0] / "metrics.jsonl").read_text().splitlines()
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(damage(lines)) + "\n")
    r = run_cli("runs", str(run), "--no-plot")
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert fragment in r.err


def test_missing_directories_and_bad_figure_names(two_runs, tmp_path):
    _, dirs = two_runs
    r = run_cli("runs", str(tmp_path / "nowhere"), "--no-plot")
    assert r.code == 1 and "nowhere is not a run directory: it does not exist" in r.err
    r = run_cli("runs", str(tmp_path), "--no-plot")
    assert r.code == 1 and "has no metrics.jsonl" in r.err
    r = run_cli("runs", str(dirs[0]), "--plot", str(tmp_path / "figure.jpg"))
    assert r.code == 1 and ".png, .svg or .pdf" in r.err and not r.out  # refused before anything is read
