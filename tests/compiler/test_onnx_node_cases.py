"""onnx's own node test cases for the CNN operators, run through cnnc as an ONNX backend.

onnx generates its node tests (one small model per operator and attribute combination, with
inputs and expected outputs) in memory; `onnx.backend.test.BackendTest` runs the ones our
INCLUDE patterns select on `CnncBackend`: the model goes through the importer
(compiler/onnx_import.py) and the NumPy backend. The first graph input is the batch (its first
dimension the batch size); the other graph inputs of a case (a Conv's W, a Gemm's B) are given
with the case's data, so the backend takes them as weights, as an exported model holds them.
Cases cnnc cannot express are excluded with the reason in EXCLUDE, not counted as passing:
`python -m pytest tests/compiler/test_onnx_node_cases.py -q` prints the pass count.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

import onnx.backend.base  # noqa: E402
import onnx.backend.test  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from cnnc.compiler.onnx_import import import_model  # noqa: E402
from cnnc.compiler.pipeline import run_pipeline  # noqa: E402
from cnnc.dsl.errors import CnncError, CnncErrors  # noqa: E402
from cnnc.runtime.model import Model  # noqa: E402


class CnncRep(onnx.backend.base.BackendRep):
    def __init__(self, model):
        self.model = model

    def run(self, inputs, **kwargs):
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        g = m.graph
        given = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
        for vi, value in zip(given[1:], inputs[1:]):  # the case's other inputs, as weights
            g.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
        try:
            graph = run_pipeline(import_model(m, f"{g.name}.onnx"))
            return [Model(graph)(np.asarray(inputs[0]))]
        except (CnncError, CnncErrors) as err:  # the message a user would read, in the test report
            raise AssertionError(err.render()) from None


class CnncBackend(onnx.backend.base.Backend):
    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        return CnncRep(model)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


# The CNN operators of onnx's node tests (patterns searched in the case names, which end in _cpu).
INCLUDE = [
    r"test_(basic_)?conv_", r"test_averagepool_", r"test_maxpool_", r"test_globalaveragepool", r"test_batchnorm_",
    r"test_gemm_", r"test_lrn", r"test_flatten_", r"test_softmax_", r"test_relu", r"test_leakyrelu",
    r"test_elu", r"test_prelu_", r"test_sigmoid", r"test_tanh", r"test_hardsigmoid", r"test_hardswish",
    r"test_clip", r"test_concat_", r"test_sum_", r"test_dropout_", r"test_identity", r"test_mish", r"test_gelu",
    r"test_reshape_", r"test_matmul_2d",
    # PyTorch's exports of its modules and operators (opset 6), the CNN ones
    r"test_(Conv2d|MaxPool2d|AvgPool2d|BatchNorm2d|Linear|ReLU|LeakyReLU|ELU|PReLU|Softmax|Sigmoid|Tanh|ZeroPad2d|"
    r"ConstantPad2d)", r"test_operator_(conv_|maxpool|flatten|view|basic|concat2|add_|addconstant|params|pad|clip|"
    r"mm|addmm)", r"test_single_relu_model",
]


def _cases(*names: str) -> str:
    return r"^test_(" + "|".join(names) + r")_cpu$"


# What cnnc cannot express, by reason: these cases are not run, so not counted as passing.
EXCLUDE = {
    "1-D and 3-D windows: cnnc has 2-D convolution and pooling on N×C×H×W": [r"_1d_", r"_3d_"],
    "tensors of rank 1, 3 or 5 in the graph (cnnc takes N×C×H×W images or N×F features)": [_cases(
        "relu", "leakyrelu", "leakyrelu_default", "leakyrelu_example", "elu", "elu_default", "elu_example", "sigmoid",
        "sigmoid_example", "tanh", "tanh_example", "hardsigmoid", "hardsigmoid_default", "hardsigmoid_example",
        "hardswish", "mish", "gelu_default_1", "gelu_default_2", "gelu_tanh_1", "gelu_tanh_2", "prelu_broadcast",
        "prelu_example", "softmax_axis_0", "softmax_axis_1", "softmax_axis_2", "softmax_default_axis",
        "softmax_negative_axis", "sum_example", "sum_one_input", "sum_two_inputs", "dropout_default",
        "dropout_default_ratio", "dropout_default_old", "dropout_random_old", "dropout_default_mask",
        "dropout_default_mask_ratio", r"clip[a-z_]*", r"concat_1d_axis_[a-z_0-9]*", r"concat_3d_[a-z_0-9]*",
        r"reshape_[a-z_]*", "ELU", "LeakyReLU", "LeakyReLU_with_negval", r"PReLU_1d[a-z_]*", r"PReLU_3d[a-z_]*",
        "operator_basic", "operator_maxpool", "operator_view", "softmax_functional_dim3")],
    "integer data: cnnc computes in float32": [r"_u?int8"],
    "optional and sequence values": [_cases("identity_opt", "identity_sequence")],
    "an operator's function body spelled out in ops cnnc has no layer for (ReduceMax, Exp, CastLike, ...)": [
        r"_expanded"],
    "a second output in use (MaxPool's indices, training BatchNormalization's statistics)": [
        r"test_maxpool_with_argmax", r"test_batchnorm_.*training_mode"],
    "pooling pads over half the kernel (cnnc's pooling, as PyTorch's, refuses windows that may lie wholly in "
    "the padding)": [_cases("averagepool_2d_pads", "averagepool_2d_pads_count_include_pad", "maxpool_2d_pads")],
    "pooling with dilations (cnnc's pooling windows are dense)": [_cases(
        "maxpool_2d_dilations", "averagepool_2d_dilations", "MaxPool2d_stride_padding_dilation")],
    "Flatten at an axis other than 1 (cnnc keeps the batch as the first dimension)": [_cases(
        "flatten_axis0", "flatten_axis2", "flatten_axis3", "flatten_negative_axis1", "flatten_negative_axis2",
        "flatten_negative_axis4")],
    "Gemm with transA or a bias per sample (cnnc's dense has one bias per unit)": [_cases(
        "gemm_transposeA", "gemm_all_attributes", "gemm_default_matrix_bias")],
    "the input concatenated with or added to a second given tensor (cnnc's merges join layer outputs)": [
        r"test_concat_2d_axis_", _cases("operator_concat2", r"operator_add_[a-z0-9_]*", "operator_addmm")],
    "a constant added to the input itself (cnnc adds constants only into the bias of the layer before)": [
        _cases("operator_addconstant", "operator_params")],
    "Clip to bounds other than [0, 6] and [0, ∞) (cnnc has relu6 and relu)": [_cases("operator_clip")],
    "a Pad that no Conv or pool follows, or reflect padding (cnnc pads in its windowed layers)": [
        _cases("ZeroPad2d", "ConstantPad2d", "operator_pad")],
}

backend_test = onnx.backend.test.BackendTest(CnncBackend, __name__)
for pattern in INCLUDE:
    backend_test.include(pattern)
for patterns in EXCLUDE.values():
    for pattern in patterns:
        backend_test.exclude(pattern)
# the model-zoo cases need the network downloads or write to ~/.onnx; tests/compiler/test_onnx_import.py
# runs the same networks
backend_test.exclude(r"test_(bvlc_alexnet|densenet121|inception_v1|inception_v2|resnet50|shufflenet|squeezenet|"
                     r"vgg19|zfnet512)")
globals().update(backend_test.test_cases)


def selected() -> list[str]:
    """The node and model cases the patterns select (as the runner names them, with _cpu)."""
    from onnx.backend.test.loader import load_model_tests
    names = [t.name + "_cpu" for kind in ("node", "simple", "pytorch-converted", "pytorch-operator")
             for t in load_model_tests(kind=kind)]
    return [n for n in names if any(re.search(p, n) for p in INCLUDE)
            and not any(re.search(p, n) for ps in EXCLUDE.values() for p in ps)]


def test_the_cnn_subset_is_large_enough():
    """Guards the patterns: a typo that silently selected nothing would leave the cases untested."""
    cases = selected()
    print(f"\n{len(cases)} onnx test cases of the CNN subset run through cnnc")
    assert len(cases) >= 40
