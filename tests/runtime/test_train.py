"""Training end to end on small data: resume is bit-for-bit, Ctrl-C checkpoints, bad input is a
clear error that overwrites nothing, and the loss of a residual BatchNorm network goes down."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest

from cnnc.dsl.errors import CnncError
from cnnc.runtime import api
from cnnc.runtime.checkpoint import read_npz

from conftest import EXAMPLES, make_data, run_cli

NET = """\
network tiny
input 1x8x8
classes 4
layers:
    conv 6 3x3 pad=1 -> bn -> relu -> maxpool 2x2
    x = relu
    conv 6 3x3 pad=1 -> add(x) -> dropout 0.25 -> gap -> dense classes
train:
    optimizer momentum momentum=0.9 weight_decay=1e-4
    lr 0.05 policy=step step_size=2 gamma=0.5
    batch 16
    epochs 4
    seed 5
"""


@pytest.fixture
def setup(tmp_path):
    net = tmp_path / "tiny.cnn"
    net.write_text(NET)
    data = make_data(tmp_path / "data.npz")
    return net, data, tmp_path


def weights(run_dir):
    arrays, meta = read_npz(run_dir / "checkpoint.npz")
    return arrays, meta


def test_resume_equals_one_run_bit_for_bit(setup):
    net, data, tmp = setup
    straight = api.train(net, data=str(data), run_dir=tmp / "a", progress=False)
    assert straight.epochs == 4
    api.train(net, data=str(data), run_dir=tmp / "b", epochs=2, progress=False)
    resumed = api.train(resume=tmp / "b", epochs=4, progress=False)
    assert resumed.epochs == 4
    a, meta_a = weights(tmp / "a")
    b, meta_b = weights(tmp / "b")
    assert set(a) == set(b)
    for k in a:  # parameters, BatchNorm buffers and optimizer state alike
        assert np.array_equal(a[k], b[k]), k
    assert [h["test_loss"] for h in meta_a["history"]] == [h["test_loss"] for h in meta_b["history"]]
    assert len((tmp / "b" / "metrics.jsonl").read_text().splitlines()) == 4


def test_interrupt_writes_a_checkpoint_and_resume_finishes_identically(setup):
    net, data, tmp = setup
    api.train(net, data=str(data), run_dir=tmp / "a", progress=False)
    trainer, _ = api.prepare(net, data=str(data), run_dir=tmp / "b", progress=False)
    step = trainer.optimizer.step

    def step_then_ctrl_c(grads, lr):  # a real SIGINT arrives during the first optimizer step
        step(grads, lr)
        if trainer.step == 0:
            signal.raise_signal(signal.SIGINT)
    trainer.optimizer.step = step_then_ctrl_c
    result = api.run(trainer)
    assert result.interrupted
    _, meta = weights(tmp / "b")
    assert meta["epoch"] == 0 and meta["cursor"] == 1 and meta["step"] == 1
    api.train(resume=tmp / "b", progress=False)
    a, meta_a = weights(tmp / "a")
    b, meta_b = weights(tmp / "b")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert meta_a["history"] == [{**h, "seconds": h0["seconds"]} for h, h0 in zip(meta_b["history"], meta_a["history"])]


def test_loss_goes_down_and_json_summary(setup):
    net, data, tmp = setup
    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp / "run"), "--epochs", "3", "--json", "-q")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    for key in ("epochs", "initial_loss", "train_loss", "test_loss", "test_accuracy", "seconds", "run_dir"):
        assert key in summary
    assert summary["epochs"] == 3
    assert abs(summary["initial_loss"] - math.log(4)) < 0.5 * math.log(4)
    assert summary["train_loss"] < summary["initial_loss"]
    assert (tmp / "run" / "metrics.jsonl").exists() and (tmp / "run" / "checkpoint.npz").exists()


def test_overrides_are_validated(setup):
    net, data, tmp = setup
    r = run_cli("train", str(net), "--data", str(data), "--lr", "-1", "-o", str(tmp / "run"))
    assert r.code == 1 and "--lr" in r.err and "greater than 0" in r.err
    assert not (tmp / "run").exists()
    r = run_cli("train", str(net), "--data", str(data), "--optimizer", "adamm", "-o", str(tmp / "run"))
    assert r.code == 1 and "--optimizer" in r.err


def test_nan_stops_training_naming_the_iteration(setup):
    net, data, tmp = setup
    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp / "run"), "--lr", "1e30", "--optimizer", "sgd",
                "-q")
    assert r.code == 1
    assert "training stopped: the loss" in r.err and "at iteration" in r.err and "smaller learning rate" in r.err
    assert "Traceback" not in r.err


@pytest.mark.parametrize("problem, fragment", [
    ("missing", "not found"),
    ("corrupt", "data.npz"),
    ("label", "label"),
    ("size", "16"),
])
def test_bad_data_is_a_clear_error_and_nothing_is_written(setup, problem, fragment):
    net, data, tmp = setup
    bad = tmp / "bad.npz"
    if problem == "corrupt":
        bad = tmp / "data.npz"
        bad.write_bytes(b"PK\x03\x04 this is not a zip file")
    elif problem == "label":
        make_data(bad, label_shift=3)  # labels up to 6 for a 4-class network
    elif problem == "size":
        make_data(bad, size=16)
    r = run_cli("train", str(net), "--data", str(bad), "-o", str(tmp / "run"))
    assert r.code == 1, r.out
    assert fragment in r.err and "Traceback" not in r.err
    assert not (tmp / "run").exists()


def test_existing_run_directory_is_not_overwritten(setup):
    net, data, tmp = setup
    run = tmp / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    r = run_cli("train", str(net), "--data", str(data), "-o", str(run))
    assert r.code == 1 and "exists" in r.err and "--resume" in r.err
    assert (run / "keep.txt").read_text() == "mine" and sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_checkpoint_of_another_network_is_refused(setup):
    net, data, tmp = setup
    api.train(net, data=str(data), run_dir=tmp / "a", epochs=1, progress=False)
    other = tmp / "other.cnn"
    other.write_text(NET.replace("conv 6 3x3 pad=1 -> add(x)", "conv 6 3x3 pad=1 -> conv 6 1x1 -> add(x)"))
    with pytest.raises(CnncError, match="holds weights of network|does not fit"):
        api.evaluate(other, tmp / "a" / "checkpoint.npz", data=str(data))
    r = run_cli("eval", str(EXAMPLES / "lenet5.cnn"), "--checkpoint", str(tmp / "a" / "checkpoint.npz"))
    assert r.code == 1 and "not `lenet5`" in r.err


def test_eval_prints_accuracy_and_confusion(setup):
    net, data, tmp = setup
    api.train(net, data=str(data), run_dir=tmp / "a", epochs=2, progress=False)
    r = run_cli("eval", str(net), "--checkpoint", str(tmp / "a" / "checkpoint.npz"), "--data", str(data), "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    confusion = np.array(out["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == 20  # the 20% test split of 96
    assert out["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())


def test_resnet20_trains_on_a_small_cifar_like_npz(tmp_path):
    data = make_data(tmp_path / "c.npz", n=120, classes=10, size=32, channels=3)
    r = run_cli("train", str(EXAMPLES / "resnet20_cifar.cnn"), "--data", str(data), "-o", str(tmp_path / "run"),
                "--epochs", "3", "--batch", "32", "--lr", "0.05", "--json", "-q")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"] < s["initial_loss"]


PLAIN = """\
network plain
input 1x8x8
classes 4
layers:
    conv 4 3x3 pad=1 lr_mult=0 -> relu -> gap -> dense classes
train:
    optimizer sgd
    lr 0.1
    batch 16
    epochs 1
    seed 2
"""


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    net = tmp_path / "plain.cnn"
    net.write_text(PLAIN.replace(" lr_mult=0", ""))
    data = make_data(tmp_path / "d.npz", n=40)  # 32 train images
    api.train(net, data=str(data), run_dir=tmp_path / "big", batch=32, progress=False)
    api.train(net, data=str(data), run_dir=tmp_path / "acc", batch=8, accumulate=4, progress=False)
    big, _ = weights(tmp_path / "big")
    acc, _ = weights(tmp_path / "acc")
    for k in big:
        if k.startswith("param/"):
            np.testing.assert_allclose(acc[k], big[k], rtol=1e-5, atol=1e-6)


def test_lr_mult_zero_freezes_a_layer(tmp_path):
    net = tmp_path / "plain.cnn"
    net.write_text(PLAIN)
    data = make_data(tmp_path / "d.npz")
    trainer, _ = api.prepare(net, data=str(data), run_dir=tmp_path / "r", progress=False)
    before = {k: v.copy() for k, v in trainer.model.params.items()}
    api.run(trainer)
    after = trainer.model.params
    assert np.array_equal(after["conv1.weight"], before["conv1.weight"])
    assert not np.array_equal(after["dense1.weight"], before["dense1.weight"])


def test_clip_norm_bounds_the_step(tmp_path):
    net = tmp_path / "plain.cnn"
    net.write_text(PLAIN.replace(" lr_mult=0", "").replace("lr 0.1", "lr 1.0\n    clip_norm 0.01"))
    data = make_data(tmp_path / "d.npz", n=20)  # 16 train images: exactly one step
    trainer, _ = api.prepare(net, data=str(data), run_dir=tmp_path / "r", progress=False)
    before = {k: v.copy() for k, v in trainer.model.params.items()}
    api.run(trainer)
    moved = np.sqrt(sum(float(((trainer.model.params[k] - before[k]) ** 2).sum()) for k in before))
    assert 0 < moved <= 0.01 * 1.0 + 1e-6  # plain SGD: the step is lr · the clipped gradient


def test_unknown_backend_lists_the_installed_ones(setup):
    net, data, tmp = setup
    r = run_cli("train", str(net), "--data", str(data), "--backend", "tpu")
    assert r.code == 1 and "unknown backend `tpu`; installed: " in r.err and "numpy" in r.err.split("installed:")[1]


def test_large_sgd_learning_rate_draws_a_warning(setup):
    net, data, tmp = setup
    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp / "r"), "--lr", "1.5", "--epochs", "1")
    assert "warning: " in r.err and "learning rate 1.5 is 1 or more with momentum" in r.err  # compiler/lint.py


# ---- top-5 and multi-crop evaluation

def test_top5_on_a_hand_made_case(tmp_path):
    """A 7-class network whose scores are its inputs (dense with identity weights): the ranks of the
    true classes are written by hand."""
    from cnnc.runtime.model import Model
    from cnnc.runtime.train import evaluate, topk_hits
    net = tmp_path / "id.cnn"
    net.write_text("network ident\ninput 7\nclasses 7\nlayers:\n    dense 7\n")
    model = Model.load(net)
    model.set_params({k: (np.eye(7, dtype=np.float32) if v.ndim == 2 else np.zeros_like(v))
                      for k, v in model.host_params().items()})
    down = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    x = np.array([down, down, [0, 0, 0, 0, 0, 0, 1], down[::-1], [1, 1, 1, 1, 1, 1, 0]], np.float32)
    y = np.array([4, 5, 6, 0, 5])
    # 5th highest: hit; 6th: miss; highest: hit (top-1 too); lowest: miss; a tie of six at the top
    # ranks by class index, so class 5 is 6th: miss.
    assert topk_hits(x, y, 5).tolist() == [True, False, True, False, False]
    ev = evaluate(model, x, y)
    assert ev.top5 == pytest.approx(2 / 5) and ev.accuracy == pytest.approx(1 / 5)
    assert topk_hits(x, y, 1).tolist() == (x.argmax(axis=1) == y).tolist()


def test_ten_crop_evaluation_equals_averaging_the_crops_by_hand(tmp_path):
    from PIL import Image
    from cnnc.runtime.model import Model
    from cnnc.runtime.train import evaluate
    from cnnc.runtime.transforms import build_pipeline
    net = tmp_path / "ten.cnn"
    net.write_text("network ten\ninput 3x32x32\nclasses 10\nlayers:\n    conv 4 3x3 -> relu -> gap -> dense classes\n"
                   "train:\n    resize 40\n    crop 32 random\n    eval_crop ten\n    normalize imagenet\n")
    model = Model.load(net)
    t = build_pipeline(model.config, (3, 32, 32), train=False)
    from test_transforms import bundled
    photos = [bundled("sklearn", "datasets", "images", n) for n in ("china.jpg", "flower.jpg")]
    photos += [p.transpose(Image.FLIP_TOP_BOTTOM) for p in photos] + [p.rotate(90, expand=True) for p in photos]
    x = np.stack([t(p, np.random.default_rng(0)) for p in photos])  # (6, 10, 3, 32, 32)
    y = np.array([0, 1, 2, 3, 4, 5])
    ev = evaluate(model, x, y, batch=4)
    logits = np.stack([model(x[:, j]) for j in range(10)], axis=1).astype(np.float64)  # (6, 10, classes)
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    p = (p / p.sum(axis=2, keepdims=True)).mean(axis=1)
    assert ev.loss == pytest.approx(float(-np.log(p[np.arange(6), y]).mean()), rel=1e-9)
    np.testing.assert_array_equal(ev.confusion.argmax(axis=1)[y], p.argmax(axis=1))
    assert ev.accuracy == pytest.approx(float((p.argmax(axis=1) == y).mean()))
    assert ev.top5 == pytest.approx(float((np.argsort(-p, axis=1, kind="stable")[:, :5] == y[:, None]).any(1).mean()))
    assert ev.images == 6


def test_eval_and_the_metrics_give_top5_with_more_than_5_classes(tmp_path):
    net = tmp_path / "eight.cnn"
    net.write_text(NET.replace("classes 4", "classes 8").replace("epochs 4", "epochs 1"))
    data = make_data(tmp_path / "data.npz", n=64, classes=8)
    api.train(net, data=str(data), run_dir=tmp_path / "a", progress=False)
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["test_top5"] <= 1 and record["test_top5"] >= record["test_accuracy"]
    r = run_cli("eval", str(net), "--checkpoint", str(tmp_path / "a" / "checkpoint.npz"), "--data", str(data))
    assert r.code == 0 and "top-5 " in r.out, r.err
    r = run_cli("eval", str(net), "--checkpoint", str(tmp_path / "a" / "checkpoint.npz"), "--data", str(data), "--json")
    assert json.loads(r.out)["top5"] == pytest.approx(record["test_top5"])


def test_image_transforms_on_array_data_are_refused_not_skipped(setup):
    net, data, tmp = setup
    net.write_text(NET.replace("    seed 5\n", "    seed 5\n    jitter brightness=0.4\n    eval_crop center\n"))
    r = run_cli("train", str(net), "--data", str(data), "-o", str(tmp / "r"))
    assert r.code == 1 and "image transforms (brightness) do not apply" in r.err, r.err
    assert "imagefolder:DIR" in r.err and not (tmp / "r").exists()


# a residual block whose shortcut joins after the BatchNorm: bn + add + relu fuse into one fused_bn
NET_BN_RESIDUAL = NET.replace("""    conv 6 3x3 pad=1 -> bn -> relu -> maxpool 2x2
    x = relu
    conv 6 3x3 pad=1 -> add(x) -> dropout 0.25 -> gap -> dense classes""", """    x = conv 6 3x3 pad=1 -> bn -> relu -> maxpool 2x2
    conv 6 3x3 pad=1 bias=false -> bn -> add(x) -> relu -> gap -> dense classes""")


@pytest.mark.parametrize("body,fused_op", [(NET, "fused_conv"), (NET_BN_RESIDUAL, "fused_bn")],
                         ids=["conv-residual", "bn-residual"])
def test_fused_training_plan_trains_the_plain_plans_weights_bit_for_bit(setup, body, fused_op):
    """cnnc train runs the -O2 training plan (conv + add, or bn + add + relu, fused: the epilogue in
    one pass); after two epochs of a conv + bn + relu network with a residual add its weights,
    BatchNorm buffers and optimizer state are those of the plain plan, to the bit."""
    net, data, tmp = setup
    assert (body == NET) == (fused_op == "fused_conv")  # the replacement above took place
    net.write_text(body)
    fused, _ = api.prepare(net, data=str(data), run_dir=tmp / "fused", progress=False, epochs=2)
    assert any(s.node.op == fused_op and s.node.attrs.residual for s in fused.plan.steps)
    api.run(fused)
    plain, _ = api.prepare(net, data=str(data), run_dir=tmp / "plain", progress=False, epochs=2, opt_level=0)
    assert not any(s.node.op.startswith("fused") for s in plain.plan.steps)
    api.run(plain)
    a, _ = weights(tmp / "fused")
    b, _ = weights(tmp / "plain")
    assert set(a) == set(b) and any(k.startswith("param/") for k in a)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_training_evaluates_with_its_fused_plan_in_cache_sized_batches(setup):
    """The evaluation after each epoch runs the training's -O2 plan (its forward is the plain plan's
    to the bit) in batches whose largest activation is about EVAL_CACHE_BYTES: the same loss and
    confusion as `evaluate` on the plain plan in those batches."""
    from cnnc.runtime.model import Model
    from cnnc.runtime.train import EVAL_BATCH, eval_batch, evaluate
    lenet = Model.load(EXAMPLES / "lenet5.cnn")
    assert eval_batch(lenet.graph, 64) == 222  # C1's 6x28x28 float32 outputs, 18,816 bytes a digit: 4 MiB
    assert eval_batch(lenet.graph, 300) == 300  # never fewer than a training batch
    net, data, tmp = setup
    trainer, _ = api.prepare(net, data=str(data), run_dir=tmp / "run", progress=False)
    assert trainer.eval_batch == EVAL_BATCH  # the tiny network's 8x8 maps: every test image in one batch
    trainer.eval_batch = 7  # several batches and a partial one
    ev = trainer._evaluate()
    plain = evaluate(trainer.model, trainer.data.test_x, trainer.data.test_y, 7)
    assert trainer.plan is not trainer.model.plan and ev.images == plain.images == len(trainer.data.test_y)
    assert ev.loss == plain.loss
    np.testing.assert_array_equal(ev.confusion, plain.confusion)
