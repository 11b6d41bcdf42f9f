"""`cnnc export`: the ONNX file it writes runs in onnxruntime with the weights it names (a
checkpoint's, or the network's seeded initial ones), and every user mistake is a one-line error."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort

from cnnc.runtime.model import Model

from conftest import EXAMPLES, run_cli

LENET = str(EXAMPLES / "lenet5.cnn")


def _run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _trained_lenet(tmp_path) -> tuple[Model, str]:
    """LeNet-5 with weights unlike its initial ones, saved as a checkpoint."""
    model = Model.load(LENET)
    rng = np.random.default_rng(7)
    model.set_params({k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in model.host_params().items()})
    ckpt = tmp_path / "weights.npz"
    model.save(ckpt)
    return model, str(ckpt)


def test_export_with_a_checkpoint_runs_in_onnxruntime(tmp_path):
    model, ckpt = _trained_lenet(tmp_path)
    out = tmp_path / "lenet5.onnx"
    r = run_cli("export", LENET, "--checkpoint", ckpt, "-O2", "-o", str(out))
    assert r.code == 0, r.err
    assert f"wrote {out}: lenet5, opset 17 (IR 8), -O2" in r.err and f"weights from {ckpt}" in r.err
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)
    ref = model(x)
    assert np.abs(_run_onnx(out, x) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_export_without_a_checkpoint_says_it_writes_the_initial_weights(tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli("export", LENET, "--opset", "13", "-o", str(out))
    assert r.code == 0, r.err
    assert "the network's initial weights (seed 0; no --checkpoint given)" in r.err
    assert onnx.load(str(out)).opset_import[0].version == 13
    x = np.random.default_rng(1).normal(size=(2, 1, 32, 32)).astype(np.float32)
    ref = Model.load(LENET)(x)  # the same seeded initialisation
    assert np.abs(_run_onnx(out, x) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bad_opset(tmp_path):
    r = run_cli("export", LENET, "--opset", "11", "-o", str(tmp_path / "m.onnx"))
    assert r.code == 1
    assert r.err.startswith("error: --opset 11 is not supported: cnnc exports opsets 13 to 22")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_checkpoint(tmp_path):
    r = run_cli("export", LENET, "--checkpoint", str(tmp_path / "nope.npz"), "-o", str(tmp_path / "m.onnx"))
    assert r.code == 1 and f"checkpoint not found: {tmp_path / 'nope.npz'}" in r.err


def test_checkpoint_of_another_network(tmp_path):
    other = Model.load(EXAMPLES / "cifar_resnet20.cnn")
    other.save(tmp_path / "resnet.npz")
    r = run_cli("export", LENET, "--checkpoint", str(tmp_path / "resnet.npz"), "-o", str(tmp_path / "m.onnx"))
    assert r.code == 1
    assert "holds weights of network `cifar_resnet20`, not `lenet5`" in r.err
    assert "Traceback" not in r.err


def test_output_into_a_missing_directory(tmp_path):
    target = tmp_path / "no" / "such" / "m.onnx"
    r = run_cli("export", LENET, "-o", str(target))
    assert r.code == 1
    assert f"cannot write {target}: directory {target.parent} does not exist" in r.err
    assert not (tmp_path / "no").exists()
    r = run_cli("export", LENET, "-o", str(tmp_path))
    assert r.code == 1 and "it is a directory" in r.err


def test_missing_onnx_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets where it is not installed
    r = run_cli("export", LENET, "-o", str(tmp_path / "m.onnx"))
    assert r.code == 1
    assert "needs the onnx package" in r.err and "pip install 'cnnc[onnx]'" in r.err


def test_an_exported_model_exports_again_with_the_same_outputs(tmp_path):
    """.cnn → ONNX → cnnc (read as a .onnx FILE) → ONNX at -O2: onnxruntime gives the same outputs."""
    model, ckpt = _trained_lenet(tmp_path)
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run_cli("export", LENET, "--checkpoint", ckpt, "-o", str(first)).code == 0
    r = run_cli("export", str(first), "-O2", "-o", str(second))
    assert r.code == 0, r.err
    assert f"the weights in {first}" in r.err
    x = np.random.default_rng(2).normal(size=(3, 1, 32, 32)).astype(np.float32)
    ref = _run_onnx(first, x)
    assert np.abs(_run_onnx(second, x) - ref).max() <= 1e-5 * np.abs(ref).max()
