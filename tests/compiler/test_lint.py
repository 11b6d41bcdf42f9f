"""The training lint (compiler/lint.py): each rule triggered by its file in tests/compiler/lint/,
located at the offending setting or layer and printed by `cnnc check` (or, for what only a run
knows, before `cnnc train`), and silent on every zoo network."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnc.compiler.lint import KNOWN_TRAIN_SIZES, lint_training
from cnnc.compiler.pipeline import check
from cnnc.compiler.train_config import TrainConfig

from conftest import EXAMPLES, make_data, run_cli

LINT = Path(__file__).parent / "lint"


def _warnings(path, **kw):
    g = check(path)
    return lint_training(g, g.graph["train"] or TrainConfig(), g.graph["train_spans"], **kw)


def _only(warnings):
    assert len(warnings) == 1, [w.message for w in warnings]
    return warnings[0]


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1)
                if text in line and not line.startswith("#"))


def test_lr_of_one_with_sgd_is_printed_by_check_at_the_lr_setting():
    path = LINT / "lr_one_sgd.cnn"
    r = run_cli("check", str(path))
    assert r.code == 0
    assert f"{path}:{_line_of(path, 'lr 1')}:8: warning: learning rate 1 is 1 or more with sgd" in r.err
    assert "try 0.1, 0.01 and 0.001" in r.err
    assert not lint_training(check(path), TrainConfig(optimizer="adam", lr=1.0))  # adaptive: not this rule


def test_batch_not_a_power_of_two_on_cuda_only():
    path = LINT / "batch_not_pow2.cnn"
    assert not _warnings(path) and not _warnings(path, backend="numpy")
    w = _only(_warnings(path, backend="cuda"))
    assert w.message.startswith("batch 100 is not a power of two") and w.span.line == _line_of(path, "batch 100")
    assert w.hint == "batch 64 or 128"


def test_short_iteration_budget_on_known_data_is_printed_by_check():
    path = LINT / "short_budget.cnn"
    r = run_cli("check", str(path))
    assert f"{path}:{_line_of(path, 'epochs 2')}:12: warning: 126 iterations (2 epochs × ⌈4000 / 64⌉" in r.err
    assert "far below the about 2,000 of small data" in r.err and "8 epochs or more" in r.err
    # more data: tens of thousands expected, under 2,500 flagged (50,000 images: 782 steps an epoch)
    w = _only(_warnings(path, train_size=50_000))
    assert w.message.startswith("1564 iterations") and "tens of thousands" in w.message
    assert not lint_training(check(path), TrainConfig(epochs=4), train_size=50_000)  # 3,128 steps
    assert not lint_training(check(path), TrainConfig(epochs=8), train_size=4000)  # 504 steps


def test_weight_decay_on_batchnorm_names_the_layer_and_the_setting():
    path = LINT / "bn_decay.cnn"
    w = _only(check(path).graph["warnings"])
    assert "weight decay 0.0005 also shrinks the scale and shift of BatchNorm `bn1`:" in w.message
    assert w.span.line == _line_of(path, "-> bn -> relu") and "more" not in w.message.split(":")[0]
    assert w.notes[0].span.line == _line_of(path, "weight_decay 5e-4")
    assert "default bn decay_mult=0" in w.hint
    assert not lint_training(check(path), TrainConfig(weight_decay=0.0))


def test_dropout_feeding_batchnorm_points_at_the_dropout():
    path = LINT / "dropout_bn.cnn"
    w = _only(check(path).graph["warnings"])
    assert w.message.startswith("`dropout1` (dropout 0.3) feeds BatchNorm `bn2`")
    assert w.span.line == _line_of(path, "dropout 0.3") and w.notes[0].span.line == _line_of(path, "gap -> dropout")
    r = run_cli("check", str(path))
    assert r.code == 0 and "warning: `dropout1`" in r.err


def test_rprop_on_mini_batches():
    path = LINT / "rprop_minibatch.cnn"
    w = _only(check(path).graph["warnings"])
    assert w.message.startswith("rprop with batch 64 < 4000 training images") and "rmsprop" in w.hint
    assert w.span.line == _line_of(path, "optimizer rprop")
    # full batch, also through accumulation; its 40 steps are not flagged as too few (the mini-batch figures)
    assert not lint_training(check(path), TrainConfig(optimizer="rprop", batch=500, accumulate=8, epochs=40),
                             train_size=4000)
    w = _only(lint_training(check(path), TrainConfig(optimizer="rprop", batch=500, epochs=100), train_size=4000))
    assert "rprop with batch 500 < 4000 training images" in w.message


def test_far_initial_loss_is_a_warning_before_training_goes_on(tmp_path):
    path = LINT / "bad_init.cnn"
    data = make_data(tmp_path / "data.npz", n=64)
    r = run_cli("train", str(path), "--data", str(data), "-o", str(tmp_path / "run"))
    assert r.code == 0, r.err
    located = f"{path}:{_line_of(path, 'dense classes')}:"
    assert located in r.err and "warning: the first loss" in r.err and "far from ln 4 = 1.39" in r.err
    assert "init gaussian init_std=3" in r.err  # the likely cause, named
    assert "wrong labels, a bad initialisation or unnormalised inputs" in r.err


def test_train_prints_the_lint_with_its_own_knowledge(tmp_path):
    """Before the first batch: the flags' values (no span in the file), the training set's size."""
    data = make_data(tmp_path / "data.npz", n=64)
    r = run_cli("train", str(LINT / "lr_one_sgd.cnn"), "--data", str(data), "-o", str(tmp_path / "r"),
                "--lr", "2", "--epochs", "2")
    head = r.err.split("initial loss")[0]
    assert f"warning: {LINT / 'lr_one_sgd.cnn'}: learning rate 2 is 1 or more with sgd" in head
    assert "2 iterations (2 epochs × ⌈52 / 64⌉ steps per epoch)" in head  # 52 of the 64 images train


def test_known_train_sizes_are_the_data_loaders():
    from cnnc.runtime.data import load_dataset
    for spec, n in KNOWN_TRAIN_SIZES.items():
        assert len(load_dataset(spec).train_y) == n


ZOO = sorted(EXAMPLES.glob("*.cnn"))


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_silent_on_the_zoo(path):
    """At check time and on the CUDA backend (the zoo's batches are powers of two); also with the
    ImageNet recipes' 1.28 million images, whose size only a run knows."""
    g = check(path)
    assert not g.graph["warnings"], [w.message for w in g.graph["warnings"]]
    config = g.graph["train"] or TrainConfig()
    size = 1_281_167 if config.data.startswith("imagefolder:imagenet") else KNOWN_TRAIN_SIZES.get(config.data)
    assert not _warnings(path, backend="cuda", train_size=size)
