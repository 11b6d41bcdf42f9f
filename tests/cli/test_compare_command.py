"""`cnnc compare`: the table, the JSON figures (equal to `cnnc check --json`'s), the bubble chart,
and the errors: every file's located diagnostics at once, missing files, bad plot paths."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import pytest

from cnnc.cli import main

from conftest import EXAMPLES, run_cli

ZOO = ["lenet5", "resnet18", "vgg16", "resnet50", "googlenet"]
DEPTHS = [5, 18, 16, 50, 22]  # conv and dense layers on the longest path, as the papers count them
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_json_figures_equal_check_json_and_papers_depths():
    r = run_cli("compare", *(str(EXAMPLES / f"{n}.cnn") for n in ZOO), "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [row["network"] for row in rows] == ZOO
    assert [row["depth"] for row in rows] == DEPTHS
    for name, row in zip(ZOO, rows):
        c = run_cli("check", str(EXAMPLES / f"{name}.cnn"), "--json")
        checked = json.loads(c.out)
        assert (row["params"], row["buffers"], row["macs"], row["input"]) == (
            checked["params"]["total"], checked["buffers"], checked["macs"], checked["input"]), name
        for key in ("params", "buffers", "macs", "depth", "inference_bytes", "training_bytes", "training_batch"):
            assert type(row[key]) is int, (name, key)
        assert row["inference_batch"] == 1
    assert rows[0]["training_batch"] == 64  # lenet5.cnn's train section


def test_the_table_in_human_units():
    r = run_cli("compare", str(EXAMPLES / "vgg16.cnn"), str(EXAMPLES / "lenet5.cnn"), "--batch", "2")
    assert r.code == 0, r.err
    vgg, lenet = r.out.splitlines()[2:4]
    # vgg16: 138,357,544 parameters, 15,470,264,320 MACs, receptive field 212 at stride 32
    assert vgg.split()[:9] == ["vgg16", "3×224×224", "138", "M", "0", "15.5", "G", "16", "212"]
    assert lenet.split()[0] == "lenet5" and lenet.split()[-1] == "2"  # --batch sets the training batch
    assert "MiB" in vgg and "inference: activations alive at once at batch 2" in r.out


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "charts" / "compare.png"
    r = run_cli("compare", *(str(EXAMPLES / f"{n}.cnn") for n in ("lenet5", "resnet50", "googlenet")),
                "--plot", str(out))
    assert r.code == 0, r.err
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000
    assert f"wrote {out}: 3 networks" in r.err
    assert r.out.splitlines()[0].startswith("network")  # the table still goes to stdout


def test_a_file_that_does_not_check_reports_every_files_errors_and_exits_1(cnn):
    bad1 = cnn("network a\ninput 1x8x8\nlayers:\n    conv 4 5x5 stride=2\n", "a.cnn")
    bad2 = cnn("network b\ninput 1x8x8\nlayers:\n    conv 4 3x3 -> relu -> maxpol 2x2\n", "b.cnn")
    r = run_cli("compare", str(bad1), str(EXAMPLES / "lenet5.cnn"), str(bad2))
    assert r.code == 1
    assert "Traceback" not in r.err and r.out == ""  # no table when a file fails, as a compiler writes nothing
    files = re.findall(r"^(.*?):\d+:\d+: error: ", r.err, re.M)
    assert files == [str(bad1), str(bad2)]
    assert [(line, col) for line, col, _ in r.errors()] == [(4, 5), (4, 27)]  # `conv`, `maxpol`
    assert "2 errors generated." in r.err


def test_a_missing_file_is_a_clear_error(tmp_path):
    r = run_cli("compare", str(EXAMPLES / "lenet5.cnn"), str(tmp_path / "nope.cnn"))
    assert r.code == 1 and "no such file" in r.err and str(tmp_path / "nope.cnn") in r.err
    assert "Traceback" not in r.err


def test_no_file_is_a_usage_error():
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(err):
        main(["compare"])
    assert exc.value.code == 2 and "the following arguments are required: FILE" in err.getvalue()


def test_an_unwritable_plot_path_is_a_clear_error(tmp_path):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_cli("compare", str(EXAMPLES / "lenet5.cnn"), "--plot", str(blocker / "c.png"))
    assert r.code == 1 and "could not write" in r.err and str(blocker / "c.png") in r.err
    assert "Traceback" not in r.err


def test_a_plot_format_other_than_png_svg_pdf_is_refused_before_any_work():
    r = run_cli("compare", str(EXAMPLES / "lenet5.cnn"), "--plot", "chart.jpg")
    assert r.code == 1 and "--plot writes .png, .svg or .pdf" in r.err and "chart.png" in r.err
    assert r.out == ""


def test_plot_without_matplotlib_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    r = run_cli("compare", str(EXAMPLES / "lenet5.cnn"), "--plot", str(tmp_path / "c.png"))
    assert r.code == 1 and "Traceback" not in r.err
    assert "needs matplotlib" in r.err and "pip install 'cnnc[plot]'" in r.err
    assert not (tmp_path / "c.png").exists() and r.out == ""
