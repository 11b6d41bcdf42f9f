"""Round trips through ONNX. A zoo `.cnn` network exported (runtime/onnx_export.py), imported
(compiler/onnx_import.py) and written back as `.cnn` (compiler/to_cnn.py) checks to the same
parameter, buffer and MAC counts and, with its weights carried over, computes the same outputs; an
ONNX model (the onnx wheel's zoo, random weights) imported and exported again gives onnxruntime
the same outputs as the original."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cnnc.compiler.onnx_import import import_model  # noqa: E402
from cnnc.compiler.pipeline import run_pipeline  # noqa: E402
from cnnc.compiler.to_cnn import write  # noqa: E402
from cnnc.runtime.model import Model  # noqa: E402
from cnnc.runtime.onnx_export import export_model  # noqa: E402

from conftest import EXAMPLES  # noqa: E402
from onnx_ref import LIGHT, ort_run, rel, with_random_weights  # noqa: E402

FAST = ["squeezenet1_1", "resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "cifar_resnet20", "googlenet", "lenet5"]
SLOW = sorted({p.stem for p in EXAMPLES.glob("*.cnn")} - set(FAST))


def _cnn_roundtrip(name: str, tmp_path, opset: int = 17) -> None:
    model = Model.load(EXAMPLES / f"{name}.cnn", seed=7)  # not the default seed: weights must travel
    exported = export_model(model, 0, opset)
    g = run_pipeline(import_model(exported.model, f"{name}.onnx"))
    written = write(g)
    path = tmp_path / f"{name}.cnn"
    path.write_text(written.text)
    again = Model.load(path)
    for k in ("params", "buffers", "macs"):
        assert again.graph.graph["totals"][k] == model.graph.graph["totals"][k], k
    again.set_params({written.param_names[k]: v for k, v in g.graph["weights"].items()}, "the imported weights")
    x = np.random.default_rng(0).normal(size=(2, *model.input_shape)).astype(np.float32)
    assert rel(again(x), model(x)) < 1e-5
    print(f"\n{name}: {written.lines()} lines after the round trip")


@pytest.mark.parametrize("name", FAST)
def test_a_zoo_network_comes_back_from_onnx_with_its_counts_and_outputs(name, tmp_path):
    _cnn_roundtrip(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_a_zoo_network_comes_back_from_onnx_with_its_counts_and_outputs_slow(name, tmp_path):
    _cnn_roundtrip(name, tmp_path)


def test_gelu_comes_back_from_its_opset_17_formula(tmp_path):
    """ConvNeXt's GELU has no ONNX operator before opset 20: the export writes its formula, the import
    finds gelu again. A small network with its blocks keeps this fast."""
    path = tmp_path / "cn.cnn"
    path.write_text("network cn\ninput 3x16x16\nclasses 5\n\nlayers:\n"
                    "    conv 8 4x4 stride=4 -> layernorm -> conv 8 3x3 pad=1 groups=8 -> layernorm ->\n"
                    "        conv 16 1x1 -> gelu -> conv 8 1x1 -> layer_scale -> gap -> flatten -> layernorm ->"
                    " dense 5\n")
    model = Model.load(path, seed=3)
    g = run_pipeline(import_model(export_model(model, 0, 17).model, "cn.onnx"))
    assert [g.nodes[n]["op"] for n in g.nodes] == [g0["op"] for _, g0 in sorted(model.graph.nodes(data=True))]
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    assert rel(Model(g)(x), model(x)) < 1e-5


def _onnx_roundtrip(name: str, tmp_path) -> None:
    original = with_random_weights(onnx.load(LIGHT / f"light_{name}.onnx"))
    path = tmp_path / f"{name}.onnx"
    onnx.save(original, path)
    again = export_model(Model.load(path), 0, 17).model
    shape = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).normal(size=[2] + shape[1:]).astype(np.float32)
    assert rel(ort_run(again, x), ort_run(original, x)) < 1e-5


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_an_onnx_model_through_cnnc_gives_onnxruntime_the_same_outputs(name, tmp_path):
    _onnx_roundtrip(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "vgg19",
                                  "zfnet512"])
def test_an_onnx_model_through_cnnc_gives_onnxruntime_the_same_outputs_slow(name, tmp_path):
    _onnx_roundtrip(name, tmp_path)

