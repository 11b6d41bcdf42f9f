"""runtime/compare.py: each network's figures (the check totals, depth, receptive field, planned
activation memory), errors of every file at once, the table's units and the bubble chart."""

from __future__ import annotations

import struct
import sys

import pytest

from cnnc.compiler import summary
from cnnc.compiler.pipeline import check
from cnnc.dsl.errors import CnncError, CnncErrors
from cnnc.runtime import budget, compare

from conftest import EXAMPLES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Weighted layers (conv and dense) on the longest path, as the papers count them: LeNet-5 3 conv +
# 2 dense (the file's C1, C3, C5, F6 and output), ResNet-18/50 and VGG-16 by their names, GoogLeNet
# 22 (Szegedy et al. 2015, "22 layers deep when counting only layers with parameters").
DEPTHS = {"lenet5": 5, "resnet18": 18, "vgg16": 16, "resnet50": 50, "googlenet": 22}

TINY = """
network tiny
input 1x8x8
classes 2
layers:
    conv 4 3x3 pad=1 -> relu -> gap -> dense classes
"""


@pytest.mark.parametrize("name", list(DEPTHS))
def test_zoo_figures_are_the_check_totals(name):
    path = EXAMPLES / f"{name}.cnn"
    (e,), _ = compare.compare([path])
    checked = summary.to_json(check(path))  # what `cnnc check --json` prints
    assert e.network == checked["network"] == name
    assert (e.params, e.buffers, e.macs) == (checked["params"]["total"], checked["buffers"], checked["macs"])
    assert list(e.input) == checked["input"]
    assert e.depth == DEPTHS[name]
    # the features the global pooling (or, in LeNet-5, the first dense layer) reads: check's last finite field
    finite = [layer["rf"] for layer in checked["layers"] if layer["rf"] != "global"]
    assert e.rf == "global" and list(e.feature_rf) == finite[-1]


def test_receptive_fields_match_the_published_ones():
    # VGG-16: 212 pixels (Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural
    # Networks", Distill 2019, table of vgg_16). AlexNet by hand: conv 11/4 → 11, pool 3/2 → 19,
    # conv 5 → 51, pool 3/2 → 67, three conv 3 → 163, pool 3/2 → 195, at a stride of 32.
    entries, _ = compare.compare([EXAMPLES / "vgg16.cnn", EXAMPLES / "alexnet.cnn"])
    assert [e.feature_rf for e in entries] == [(212, 212, 32, 32), (195, 195, 32, 32)]


def test_depth_is_the_longest_input_to_output_path(cnn):
    path = cnn("""
        network branchy
        input 3x16x16
        classes 10
        layers:
            x = conv 8 3x3 pad=1
            side = x -> conv 8 3x3 pad=1 -> conv 8 3x3 pad=1 -> conv 8 3x3 pad=1 -> conv 8 3x3 pad=1
            main = x -> conv 8 3x3 pad=1 -> bn -> relu -> conv 8 3x3 pad=1
            short = x -> conv 8 1x1
            add(main, short) -> relu -> gap -> dense classes
        """)
    (e,), warnings = compare.compare([path])
    # conv x, the two convs of `main`, dense: 4; the shortcut is shorter and `side` never reaches the output
    assert e.depth == 4
    assert any("never used" in w.message for w in warnings)


def test_memory_is_the_planner_figure_at_batch_1_and_the_train_batch(cnn):
    (e,), _ = compare.compare([cnn(TINY)])
    # By hand (float32): input 1×8×8 = 256 B, conv 4×8×8 = 1024 B, relu in place over it, gap 16 B,
    # dense 8 B. Inference peak: input and conv output together, 1280 B (`cnnc check`'s simpler count,
    # without the in-place relu, says 2048).
    assert e.inference_batch == 1 and e.inference_bytes == 1280
    assert check(cnn(TINY)).graph["totals"]["inference_bytes"] == 2048
    # Training, per image: at the relu's backward the input (kept for conv's weight gradient), relu's
    # output (its derivative reads y), the gradients of conv's and relu's outputs and the logits are
    # alive: 256 + 3·1024 + 8 = 3336 B. No train section: the default batch of `cnnc train`, 64.
    assert e.training_batch == 64 and e.training_bytes == 64 * 3336


def test_memory_agrees_with_the_budget_check_before_training():
    path = EXAMPLES / "resnet18.cnn"
    (e,), _ = compare.compare([path])
    est = budget.run_estimate(check(path), "training", e.training_batch, training=True)
    assert dict(est.parts)[f"activations at batch {e.training_batch}"] == e.training_bytes


def test_batch_sets_both_figures_and_the_train_section_sets_the_default(cnn):
    trained = cnn(TINY + "train:\n    batch 16\n", "trained.cnn")
    (default,), _ = compare.compare([trained])
    assert (default.inference_batch, default.training_batch) == (1, 16)
    assert default.training_bytes == 16 * 3336
    (given,), _ = compare.compare([trained], batch=3)
    assert (given.inference_batch, given.training_batch) == (3, 3)
    assert (given.inference_bytes, given.training_bytes) == (3 * 1280, 3 * 3336)


def test_a_fully_convolutional_network_reports_its_output_field(cnn):
    path = cnn("""
        network fcn
        input 3x32x32
        layers:
            conv 8 3x3 pad=1 -> relu -> maxpool 2x2 -> conv 4 3x3 pad=1
        """)
    (e,), _ = compare.compare([path])
    # 3, then a 2x2/2 pool → 4 at stride 2, then 3x3 → 4 + 2·2 = 8
    assert e.rf == (8, 8, 2, 2) == e.feature_rf
    assert e.to_json()["rf"] == [8, 8, 2, 2]


def test_every_file_is_checked_and_all_errors_are_raised_together(cnn, tmp_path):
    bad1 = cnn("network a\ninput 1x8x8\nlayers:\n    conv 4 5x5 stride=2\n", "a.cnn")
    bad2 = cnn("network b\ninput 1x8x8\nlayers:\n    cnov 4 3x3\n", "b.cnn")
    with pytest.raises(CnncErrors) as exc:
        compare.compare([bad1, EXAMPLES / "lenet5.cnn", bad2, tmp_path / "missing.cnn"])
    errors = exc.value.errors
    assert [e.span.file if e.span else None for e in errors] == [str(bad1), str(bad2), None]
    assert (errors[0].span.line, errors[1].span.line) == (4, 4)
    assert "no such file" in errors[2].message


def test_no_files_is_an_error():
    with pytest.raises(CnncError, match="at least one"):
        compare.compare([])


def test_counts_read_with_si_prefixes():
    assert [compare.human_count(n) for n in (0, 999, 61_706, 416_520, 25_557_032, 138_357_544, 4_089_184_256,
                                             999_999)] == ["0", "999", "61.7 K", "417 K", "25.6 M", "138 M",
                                                           "4.09 G", "1.00 M"]


def test_the_table_has_one_row_per_network_in_order():
    entries, _ = compare.compare([EXAMPLES / "resnet50.cnn", EXAMPLES / "lenet5.cnn"])
    lines = compare.table(entries).splitlines()
    assert lines[0].split() == ["network", "input", "params", "buffers", "MACs", "depth", "RF", "inference",
                                "training", "batch"]
    assert lines[2].split()[:9] == ["resnet50", "3×224×224", "25.6", "M", "53.1", "K", "4.09", "G", "50"]
    assert lines[3].split()[:7] == ["lenet5", "1×32×32", "61.7", "K", "0", "417", "K"]


def test_the_plot_is_a_png_of_the_figure_size(tmp_path):
    pytest.importorskip("matplotlib")
    entries, _ = compare.compare([EXAMPLES / "lenet5.cnn", EXAMPLES / "resnet18.cnn", EXAMPLES / "vgg16.cnn"])
    out = tmp_path / "c.png"
    compare.write_plot(entries, out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (9 * 120, int(6.5 * 120))  # figsize × dpi
    assert len(data) > 20_000  # axes, three bubbles, labels: far more than an empty canvas


def test_the_plot_without_matplotlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(CnncError) as exc:
        compare.require_plotting()
    assert "matplotlib" in exc.value.message and exc.value.hint == "pip install 'cnnc[plot]' (matplotlib)"


def test_the_plot_format_comes_from_the_extension():
    assert compare.plot_format("a/b.PNG") == "png" and compare.plot_format("x.svg") == "svg"
    with pytest.raises(CnncError, match=r"\.png, \.svg or \.pdf"):
        compare.plot_format("chart.jpg")


def test_a_squeeze_excitation_gate_is_a_side_branch(cnn):
    # EfficientNet-B0 by hand: stem 1, the first MBConv (no expansion) 2, fifteen more with 3 (expand,
    # depthwise, project), the head 1x1 and the classifier: 1 + 2 + 45 + 1 + 1 = 50; each block's two
    # squeeze-excitation convs sit on the gate, not on the map's path, as the paper counts.
    (e,), _ = compare.compare([EXAMPLES / "efficientnet_b0.cnn"])
    assert e.depth == 50
    path = cnn("""
        network se
        input 3x16x16
        classes 4
        layers:
            x = conv 8 3x3 pad=1
            gate = x -> gap -> conv 2 1x1 -> relu -> conv 8 1x1 -> sigmoid
            mul(x, gate) -> conv 8 3x3 pad=1 -> gap -> dense classes
        """)
    (e,), _ = compare.compare([path])
    g = check(path)
    rf = {d["name"]: d["rf"] for _, d in g.nodes(data=True)}
    # the gate sees the whole image; the product keeps the map's window (3), the next conv grows it to 5
    assert rf["gap1"] == "global" and rf["mul1"] == (3, 3, 1, 1) and rf["conv4"] == (5, 5, 1, 1)
    assert e.depth == 3 and e.feature_rf == (5, 5, 1, 1)
