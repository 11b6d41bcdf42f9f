"""examples/photos_small.cnn trained through `cnnc train` on the real photos bundled in
scikit-learn and scikit-image (5 classes, JPEG/PNG/WebP of varied sizes) with a truncated JPEG,
an empty file and a decompression bomb among them: the recipe's syntax runs end to end, the
three broken files are named and counted, the curves are written and the network learns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import photos
from conftest import REPO, run_cli

pytest.importorskip("PIL")

BROKEN = ("00_china/0003b.jpg", "02_astronaut/0001b.jpg", "04_chelsea/0002b.png")


def make_folder(root: Path, per_class: int = 16) -> Path:
    """root/<class>/...: the bundled photos as 5 classes, plus the three broken files of BROKEN."""
    photos.photo_folder(root, per_class=per_class, classes=5, max_side=120)
    photos.write_truncated_jpeg(root / BROKEN[0])
    photos.write_zero_bytes(root / BROKEN[1])
    photos.write_bomb_png(root / BROKEN[2])
    return root


def test_photos_small_recipe_trains_on_real_photos_and_counts_bad_images(tmp_path):
    make_folder(tmp_path / "photos")
    net = tmp_path / "photos_small.cnn"
    shutil.copy(REPO / "examples" / "photos_small.cnn", net)
    data = f"imagefolder:{tmp_path / 'photos'}"
    r = run_cli("train", str(net), "--data", data, "-o", str(tmp_path / "run"), "--workers", "1", "--epochs", "4")
    assert r.code == 0, r.err
    for name in BROKEN:
        assert Path(name).name in r.err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [rec for rec in records if "test_accuracy" in rec]
    assert len(epochs) == 4
    assert epochs[-1]["bad_images"] >= 1 and "bad image(s) skipped" in r.out
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["test_accuracy"] > 0.2 + 0.1  # chance is 1 in 5
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
