"""`cnnc bench`: the JSON fields, per-layer rows, and PyTorch or onnxruntime as a peer in the same process."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, run_cli


def test_bench_json_with_torch_peer():
    pytest.importorskip("torch")
    r = run_cli("bench", str(EXAMPLES / "lenet5.cnn"), "--batch", "8", "--train", "--vs", "torch", "--repeats", "2",
                "--json")
    assert r.code == 0, r.err
    j = json.loads(r.out)
    for key in ("ms_per_step", "images_per_s", "peer", "peer_ms_per_step", "ratio"):
        assert key in j
    assert j["peer"] == "torch" and j["ratio"] == pytest.approx(j["ms_per_step"] / j["peer_ms_per_step"])
    assert j["images_per_s"] == pytest.approx(1000 * 8 / j["ms_per_step"])


def test_bench_layers_are_sorted_and_shares_sum_to_one():
    r = run_cli("bench", str(EXAMPLES / "lenet5.cnn"), "--batch", "4", "--layers", "--repeats", "2", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["layers"]
    totals = [x["forward_ms"] + x["backward_ms"] for x in rows]
    assert totals == sorted(totals, reverse=True)
    assert sum(x["share"] for x in rows) == pytest.approx(1.0)
    assert json.loads(r.out)["peer"] is None


def test_bench_against_onnxruntime_uses_our_thread_count(monkeypatch):
    """The exported network in onnxruntime, same batch, as many intra-op threads as our backend,
    checked to give our output before it is timed."""
    monkeypatch.setenv("CNNC_NUM_THREADS", "1")
    r = run_cli("bench", str(EXAMPLES / "cifar_resnet20.cnn"), "--batch", "3", "--vs", "onnxruntime",
                "--repeats", "2")
    assert r.code == 0, r.err
    line = next(x for x in r.out.splitlines() if x.startswith("onnxruntime ("))
    assert "CPU, opset 17, 1 intra-op thread," in line and "ratio (ours / onnxruntime)" in line
    r = run_cli("bench", str(EXAMPLES / "lenet5.cnn"), "--batch", "2", "--vs", "onnxruntime", "--repeats", "2",
                "--json")
    j = json.loads(r.out)
    assert j["peer"] == "onnxruntime" and j["ratio"] == pytest.approx(j["ms_per_step"] / j["peer_ms_per_step"])

    from cnnc.runtime.model import Model
    from cnnc.runtime.peers import onnxruntime_session
    sess, _ = onnxruntime_session(Model.load(EXAMPLES / "lenet5.cnn"), 1)
    assert sess.get_session_options().intra_op_num_threads == 1


def test_bench_onnxruntime_times_inference_only():
    r = run_cli("bench", str(EXAMPLES / "lenet5.cnn"), "--train", "--vs", "onnxruntime", "--repeats", "1")
    assert r.code == 1 and "--vs onnxruntime times inference only" in r.err


def test_the_executor_reports_every_step_it_runs():
    import numpy as np

    from cnnc.backends.base import Ctx
    from cnnc.runtime.model import Model

    model = Model.load(EXAMPLES / "lenet5.cnn")
    x = np.random.default_rng(0).normal(size=(2, *model.input_shape)).astype(np.float32)
    seen = []
    on_step = lambda step, phase, seconds: seen.append((step.node.name, phase, seconds))  # noqa: E731
    ctx = Ctx(training=True, rng=np.random.default_rng(0))
    out = model.executor.forward(x, ctx, on_step=on_step)
    names = [s.node.name for s in model.plan.steps]
    assert [(n, p) for n, p, _ in seen] == [(n, "forward") for n in names]
    assert all(t >= 0 for _, _, t in seen)
    plain = model.executor.forward(x, Ctx(training=True, rng=np.random.default_rng(0)))
    assert np.array_equal(out, plain)  # timing changes nothing
    seen.clear()
    model.executor.backward(np.ones_like(out), on_step=on_step)
    assert [n for n, p, _ in seen] == names[::-1] and {p for _, p, _ in seen} == {"backward"}


def test_layer_times_has_one_row_per_step_with_backward_when_training():
    import numpy as np

    from cnnc.runtime.bench import layer_times
    from cnnc.runtime.model import Model

    model = Model.load(EXAMPLES / "lenet5.cnn")
    x = np.zeros((2, *model.input_shape), np.float32)
    rows = layer_times(model, x, train=True, repeats=2)
    assert sorted(r["layer"] for r in rows) == sorted(s.node.name for s in model.plan.steps)
    assert all(r["forward_ms"] > 0 and r["backward_ms"] > 0 for r in rows)
    assert all(r["backward_ms"] == 0 for r in layer_times(model, x, train=False, repeats=1))
