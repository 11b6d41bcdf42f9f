"""The image-transform settings of the `train:` section (compiler/train_config.py): the syntax,
and the mistakes each reported at its line and column, checked against the network's input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

NET = "input {shape}\nlayers:\n    conv 8 3x3 -> gap -> dense 10\ntrain:\n"


def write(cnn, lines: list[str], shape: str = "3x224x224"):
    return cnn(NET.format(shape=shape) + "".join(f"    {line}\n" for line in lines))


def train_json(cnn, lines: list[str], shape: str = "3x224x224") -> dict:
    r = run_cli("check", str(write(cnn, lines, shape)), "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)["train"]


def test_the_alexnet_recipe_reads_as_written(cnn):
    t = train_json(cnn, ["resize 256", "crop 227 random", "flip", "mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)",
                         "lighting 0.1 eigen=imagenet", "jitter brightness=0.4 contrast=0.4 saturation=0.4",
                         "eval_crop ten"], "3x227x227")
    assert t["resize"] == 256 and t["crop_size"] == [227, 227] and t["crop_mode"] == "random" and t["flip"] is True
    assert t["mean"] == [0.485, 0.456, 0.406] and t["std"] == [0.229, 0.224, 0.225]
    assert t["lighting"] == 0.1 and t["eigen"] == "imagenet" and t["eval_crop"] == "ten"
    assert (t["brightness"], t["contrast"], t["saturation"], t["hue"]) == (0.4, 0.4, 0.4, 0.0)


def test_random_resized_crop_and_the_other_spellings(cnn):
    t = train_json(cnn, ["random_resized_crop 224 scale=(0.08, 1.0) ratio=(0.75, 1.333)", "resize 256",
                         "normalize imagenet", "jitter 0.3 hue=0.1"])
    assert t["random_resized_crop"] == [224, 224] and t["scale"] == [0.08, 1.0] and t["ratio"] == [0.75, 1.333]
    assert t["mean"] == [0.485, 0.456, 0.406] and t["normalize"] is True
    assert (t["brightness"], t["saturation"], t["hue"]) == (0.3, 0.3, 0.1)
    t = train_json(cnn, ["crop 24x32 center", "normalize measured", "stats_images 200"], "1x24x32")
    assert t["crop_size"] == [24, 32] and t["crop_mode"] == "center" and t["mean"] is None and t["stats_images"] == 200


def test_the_padding_crop_keeps_its_spelling(cnn):
    assert train_json(cnn, ["crop 4", "flip true"], "3x32x32")["crop"] == 4
    t = train_json(cnn, ["crop 4 pad"], "3x32x32")
    assert t["crop"] == 4 and t["crop_size"] is None


@pytest.mark.parametrize("lines, shape, line, col, fragment", [
    (["resize 256", "crop 227 random"], "3x224x224", 6, 10, "crop 227×227 does not give the input's size"),
    (["random_resized_crop 200"], "3x224x224", 5, 25, "random_resized_crop 200×200 does not give"),
    (["crop 224"], "3x224x224", 5, 10, "`crop 224` alone is the zero-padding crop"),
    (["crop 224 randm"], "3x224x224", 5, 14, "unknown crop mode `randm`"),
    (["resize 256"], "3x224x224", 5, 12, "sets only the short side"),
    (["resize 200", "crop 224 center"], "3x224x224", 5, 12, "smaller than the 224×224 crop"),
    (["resize 224x200"], "3x224x224", 5, 12, "resize 224×200 does not give the input's size"),
    (["crop 224 center", "mean (0.5, 0.5) std (0.2, 0.2)"], "3x224x224", 6, 10, "`mean` has 2 value(s)"),
    (["crop 224 center", "mean (0.5, 0.5, 0.5)"], "3x224x224", 6, 10, "`mean` and `std` go together"),
    (["crop 224 center", "normalize false", "mean (0.5, 0.5, 0.5) std (0.2, 0.2, 0.2)"], "3x224x224", 6, 15,
     "`normalize false` but a `mean`"),
    (["crop 32 random", "lighting 0.1"], "1x32x32", 6, 14, "PCA lighting noise is for RGB images"),
    (["jitter saturation=0.4"], "1x32x32", 5, 12, "`saturation` jitter is for RGB images"),
    (["jitter"], "3x32x32", 5, 5, "`jitter` needs its strengths"),
    (["lighting 0.1 eigen=imagenett"], "3x32x32", 5, 18, "unknown eigen `imagenett`"),
    (["eigen imagenet"], "3x32x32", 5, 11, "`eigen` chooses the eigenvectors of `lighting`"),
    (["eval_crop ten"], "3x32x32", 5, 15, "ten-crop evaluation needs a crop size"),
    (["eval_crop eleven"], "3x32x32", 5, 15, "unknown eval_crop `eleven`"),
    (["crop 32 random", "scale (0.5, 1.0)"], "3x32x32", 6, 11, "`scale` belongs to random_resized_crop"),
    (["random_resized_crop 32 scale=(0.9, 0.1)"], "3x32x32", 5, 28, "`scale` is a range (low, high)"),
    (["random_resized_crop 32", "crop 32 center"], "3x32x32", 6, 10, "cannot both be taken"),
    (["hue 0.6"], "3x32x32", 5, 9, "`hue` must be less than or equal to 0.5"),
    (["random_resized_crop 32", "crop 4"], "3x32x32", 6, 10, "a padding crop and a crop of a size"),
    (["crop_mode random"], "3x32x32", 5, 15, "`crop_mode` without a crop size"),
    (["crop 16 center"], "16", 5, 10, "image transforms need an image input"),
])
def test_mistakes_are_located(cnn, lines, shape, line, col, fragment):
    r = run_cli("check", str(write(cnn, lines, shape)))
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert (line, col) in [(a, b) for a, b, m in r.errors() if fragment in m], r.err


def test_the_ambiguous_crop_hint_names_both_meanings(cnn):
    r = run_cli("check", str(write(cnn, ["crop 224"])))
    assert "`crop 224 random` or `crop 224 center`" in r.err and "`crop 224 pad`" in r.err, r.err


def test_written_back_as_text_the_transforms_check_the_same(cnn):
    from cnnc.compiler.pipeline import check
    from cnnc.compiler.to_cnn import write_cnn
    path = write(cnn, ["resize 256", "crop 227 random", "flip", "mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)",
                       "lighting 0.1 eigen=imagenet", "jitter 0.4 hue=0.05", "eval_crop ten"], "3x227x227")
    g = check(path)
    again = cnn(write_cnn(g), "again.cnn")
    assert check(again).graph["train"] == g.graph["train"]
    pad = check(write(cnn, ["crop 4"], "3x32x32"))
    assert check(cnn(write_cnn(pad), "pad.cnn")).graph["train"].crop == 4


def test_precision_reads_as_a_line_or_a_keyword_and_a_wrong_one_lists_the_choices(cnn):
    assert train_json(cnn, ["precision bf16"])["precision"] == "bf16"
    assert train_json(cnn, ["batch 32 precision=fp16"])["precision"] == "fp16"
    assert train_json(cnn, ["batch 32"])["precision"] == "fp32"
    r = run_cli("check", str(write(cnn, ["batch 32", "precision bf61"])))
    assert r.code == 1
    _, line, col, message = r.first_error()
    assert (line, col, message) == (6, 15, "unknown precision `bf61`")
    assert "choices: fp32, tf32, bf16, fp16" in r.err
