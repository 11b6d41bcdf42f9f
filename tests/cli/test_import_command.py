"""`cnnc import model.onnx -o model.cnn --weights w.npz`, and a `.onnx` file given to the commands
that take a `.cnn` (compile and run, viz, bench, train): outputs checked against onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cnnc.runtime.model import Model  # noqa: E402

from conftest import run_cli  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ort.set_default_logger_severity(3)


def _squeezenet(tmp_path: Path) -> Path:
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "compiler"))
    from test_onnx_import import with_random_weights
    path = tmp_path / "squeezenet.onnx"
    onnx.save(with_random_weights(onnx.load(LIGHT / "light_squeezenet.onnx")), path)
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])


def rel(a, b) -> float:
    return float(np.abs(a.reshape(b.shape) - b).max() / np.abs(b).max())


def test_import_writes_a_cnn_file_and_weights_that_compute_the_model(tmp_path):
    src = _squeezenet(tmp_path)
    out, weights = tmp_path / "sq.cnn", tmp_path / "sq.npz"
    r = run_cli("import", str(src), "-o", str(out), "--weights", str(weights))
    assert r.code == 0, r.err
    assert f"→ {out}" in r.err
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    model = Model.load(out)
    model.load_weights(weights)
    assert rel(model(x), _ort(src, x)) < 1e-5
    checked = run_cli("check", str(out), "--json")
    direct = run_cli("check", str(src), "--json")
    for k in ("params", "buffers", "macs"):
        assert json.loads(checked.out)[k] == json.loads(direct.out)[k]


def test_compile_and_run_take_an_onnx_file(tmp_path):
    src = _squeezenet(tmp_path)
    art = tmp_path / "art"
    r = run_cli("compile", str(src), "-o", str(art))
    assert r.code == 0, r.err
    x = np.random.default_rng(1).normal(size=(1, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = run_cli("run", str(art), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert r.code == 0, r.err
    assert rel(np.load(tmp_path / "y.npy"), _ort(src, x)) < 1e-5


def test_viz_takes_an_onnx_file(tmp_path):
    r = run_cli("viz", str(LIGHT / "light_inception_v1.onnx"), "-o", str(tmp_path / "g.dot"))
    assert r.code == 0, r.err
    assert "digraph" in (tmp_path / "g.dot").read_text()


def test_import_refuses_a_cnn_file(tmp_path):
    r = run_cli("import", "examples/lenet5.cnn")
    assert r.code == 1 and "reads .onnx models" in r.err
