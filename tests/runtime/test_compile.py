"""`cnnc compile` and `cnnc run`: optimised plans compute what the plain ones do, for every zoo
network; training plans keep exact gradients; artifacts run without the source and reject
corrupt or mismatched files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnc.backends.base import Ctx
from cnnc.compiler.pipeline import PassContext, optimize
from cnnc.dsl.errors import CnncError
from cnnc.runtime.artifact import CompiledModel, compile_graph, compile_model, read_artifact, write_artifact
from cnnc.runtime.executor import Executor
from cnnc.runtime.model import Model

from conftest import EXAMPLES, run_cli

ZOO = sorted(p.stem for p in EXAMPLES.glob("*.cnn"))


def randomise_batchnorm(model: Model, rng) -> None:
    """Running statistics away from 0/1, so that folding them is really tested."""
    for k, v in model.params.items():
        if k.endswith("running_mean"):
            v[...] = rng.normal(0, 0.1, v.shape)
        elif k.endswith("running_var"):
            v[...] = rng.uniform(0.5, 1.5, v.shape)
        elif k.endswith(".bias") or (k.endswith(".weight") and v.ndim == 1):
            v[...] = rng.normal(0, 0.1, v.shape) + (1.0 if v.ndim == 1 and k.endswith(".weight") else 0.0)


@pytest.mark.parametrize("name", ZOO)
def test_O0_and_O2_agree_on_every_zoo_network(name):
    rng = np.random.default_rng(1)
    model = Model.load(EXAMPLES / f"{name}.cnn", seed=1)
    randomise_batchnorm(model, rng)
    x = rng.normal(size=(1, *model.input_shape)).astype(np.float32)
    plain = compile_model(model, opt_level=0)
    fast = compile_model(model, opt_level=2, ctx=PassContext(verify=True))
    y0, y2 = plain(x), fast(x)
    assert fast.graph.number_of_nodes() <= plain.graph.number_of_nodes()
    err = np.abs(y2 - y0).max() / max(np.abs(y0).max(), 1e-12)
    assert err <= 1e-4, err


@pytest.mark.parametrize("name", ["lenet5", "resnet20_cifar", "googlenet_2014"])
def test_training_plan_gradients_are_exact(name):
    rng = np.random.default_rng(2)
    model = Model.load(EXAMPLES / f"{name}.cnn", seed=2)
    size = model.input_shape
    x = rng.normal(size=(2, *size)).astype(np.float32)
    ctx = type(model.backend).configure(PassContext(mode="training", verify=True))
    g2 = optimize(model.graph, ctx, model.host_params())
    assert g2.number_of_nodes() <= model.graph.number_of_nodes()
    fast = Executor(model.backend.compile(g2), model.backend, model.params)
    out0 = model.executor.forward(x, Ctx(training=True, rng=np.random.default_rng(0)))
    r = rng.normal(size=out0.shape).astype(np.float32)
    g0 = model.executor.backward(r)
    out2 = fast.forward(x, Ctx(training=True, rng=np.random.default_rng(0)))
    grads2 = fast.backward(r)
    np.testing.assert_allclose(out2, out0, rtol=1e-5, atol=1e-6)
    assert set(grads2) == set(g0)
    for k in g0:
        err = np.linalg.norm(grads2[k] - g0[k]) / max(np.linalg.norm(g0[k]), 1e-12)
        assert err <= 1e-5, (k, err)


def test_resnet50_report_folds_every_batchnorm_and_fuses_residuals():
    r = run_cli("compile", str(EXAMPLES / "resnet50.cnn"), "--report")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    folds = [x for x in lines if "conv + bn → conv with folded batchnorm" in x]
    residual = [x for x in lines if "conv + bn + add + relu → fused conv_bn_add_relu" in x]
    assert len(folds) == 53  # every conv of ResNet-50 is followed by a BatchNorm
    assert len(residual) == 16  # one per bottleneck
    assert all(x.split()[0].startswith(str(EXAMPLES / "resnet50.cnn") + ":") for x in folds + residual)
    # the residual adds are written on two lines: one in `bottleneck`, one in `bottleneck_down`
    source = (EXAMPLES / "resnet50.cnn").read_text(encoding="utf-8").splitlines()
    add_lines = {str(i) for i, text in enumerate(source, 1) if "add(" in text}
    assert len(add_lines) == 2
    assert {x.split()[0].rsplit(":", 1)[1] for x in residual} == add_lines
    assert "without planning" in r.out


def test_compiled_lenet_reproduces_eval_accuracy(tmp_path):
    from cnnc.runtime import api
    from cnnc.runtime.data import load_dataset
    net = EXAMPLES / "lenet5.cnn"
    api.train(net, run_dir=tmp_path / "run", epochs=1, progress=False)
    ckpt = tmp_path / "run" / "checkpoint.npz"
    r = run_cli("eval", str(net), "--checkpoint", str(ckpt), "--json")
    assert r.code == 0, r.err
    eval_accuracy = json.loads(r.out)["accuracy"]
    r = run_cli("compile", str(net), "--checkpoint", str(ckpt), "-o", str(tmp_path / "art"))
    assert r.code == 0, r.err
    data = load_dataset("mnist5k", pad_to=(32, 32))
    np.save(tmp_path / "x.npy", data.test_x)
    r = run_cli("run", str(tmp_path / "art"), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.code == 0, r.err
    y = np.load(tmp_path / "y.npy")
    accuracy = float((y.argmax(axis=1) == data.test_y).mean())
    assert accuracy == pytest.approx(eval_accuracy, abs=1e-12)
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())
    assert plan["format"] == "cnnc-plan" and plan["version"] == 1 and plan["opt_level"] == 2
    assert any(n["op"] == "fused_conv" for n in plan["nodes"])


def test_artifact_round_trip_and_errors(tmp_path):
    model = Model.load(EXAMPLES / "resnet20_cifar.cnn")
    cm = compile_model(model)
    write_artifact(*compile_graph(model), tmp_path / "a")
    back = read_artifact(tmp_path / "a")
    assert isinstance(back, CompiledModel)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(back(x), cm(x))
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    plan["version"] = 99
    (tmp_path / "a" / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CnncError, match="format version 99"):
        read_artifact(tmp_path / "a")
    (tmp_path / "a" / "plan.json").write_text("{ not json")
    r = run_cli("run", str(tmp_path / "a"), "--input", "x.npy")
    assert r.code == 1 and "not valid JSON" in r.err and "Traceback" not in r.err
    write_artifact(*compile_graph(model), tmp_path / "b")
    write_artifact(*compile_graph(Model.load(EXAMPLES / "lenet5.cnn")), tmp_path / "c")
    (tmp_path / "b" / "weights.npz").write_bytes((tmp_path / "c" / "weights.npz").read_bytes())
    with pytest.raises(CnncError, match="holds weights of `lenet5`"):
        read_artifact(tmp_path / "b")
    r = run_cli("run", str(tmp_path / "nowhere"), "--input", "x.npy")
    assert r.code == 1 and "not a compiled artifact" in r.err


def test_compile_removes_leftovers_of_a_killed_compile(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    stale = [out / ".plan.json.k1ll3d.tmp", out / ".weights.npz.x.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 100)
    r = run_cli("compile", str(EXAMPLES / "lenet5.cnn"), "-o", str(out))
    assert r.code == 0, r.err
    assert not list(out.glob(".*.tmp")) and (out / "plan.json").exists()
