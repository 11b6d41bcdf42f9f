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
from onnx_ref import LIGHT, rel, with_random_weights  # noqa: E402


def _squeezenet(tmp_path: Path) -> Path:
    path = tmp_path / "squeezenet.onnx"
    onnx.save(with_random_weights(onnx.load(LIGHT / "light_squeezenet.onnx")), path)
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])


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


def test_viz_takes_an_onnx_file_with_its_repeated_structure_as_blocks(tmp_path):
    r = run_cli("viz", str(LIGHT / "light_inception_v1.onnx"), "-o", str(tmp_path / "g.dot"))
    assert r.code == 0, r.err
    assert "digraph" in (tmp_path / "g.dot").read_text()
    assert "9 block instances" in r.err  # the inceptions, recovered as blocks, are clusters


def test_import_refuses_a_cnn_file(tmp_path):
    r = run_cli("import", "examples/lenet5.cnn")
    assert r.code == 1 and "reads .onnx models" in r.err


def _tiny(tmp_path: Path) -> Path:
    """A small classifier exported by PyTorch: conv, relu, global average pooling, flatten, linear."""
    torch = pytest.importorskip("torch")
    import io
    import warnings
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 3)).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 1, 8, 8),), f, dynamo=False, opset_version=13, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    path = tmp_path / "tiny.onnx"
    path.write_bytes(f.getvalue())
    return path


def test_train_fine_tunes_an_onnx_model_from_its_weights(tmp_path):
    from cnnc.compiler.pipeline import check
    from cnnc.runtime.checkpoint import parameters, read_npz

    src = _tiny(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((40, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 3, 40))
    run = tmp_path / "run"
    r = run_cli("train", str(src), "--data", str(tmp_path / "d.npz"), "--epochs", "1", "--lr", "0.001",
                "--batch", "8", "-o", str(run), "--quiet")
    assert r.code == 0, r.err
    start = check(src).graph["weights"]
    trained = parameters(read_npz(run / "checkpoint.npz")[0], run / "checkpoint.npz")
    for k, v in start.items():  # fine-tuned: close to the file's weights, not a fresh initialisation
        assert np.abs(trained[k] - v).max() < 0.05 * np.abs(v).max() + 1e-3, k
    r = run_cli("eval", str(src), "--checkpoint", str(run / "checkpoint.npz"), "--data", str(tmp_path / "d.npz"))
    assert r.code == 0, r.err


def test_bench_takes_an_onnx_file(tmp_path):
    r = run_cli("bench", str(_tiny(tmp_path)), "--batch", "2", "--repeats", "2", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["ms_per_step"] > 0


def test_parity_size_needs_a_cnn_source(tmp_path):
    r = run_cli("parity", str(_tiny(tmp_path)), "--backends", "numpy,numpy", "--size", "4x4")
    assert r.code == 1 and "is an ONNX model" in r.err and "cnnc import" in r.err
