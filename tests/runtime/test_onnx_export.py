"""ONNX export (runtime/onnx_export.py), with onnxruntime as the oracle: every zoo network and every
op of the table, exported at -O0 and -O2, passes onnx's full checker and gives in onnxruntime the
NumPy backend's output (max|Δ| / max|ref| ≤ 1e-5, float32) at batch 1 and at batch 3 through the
symbolic batch dimension."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import CnncError
from cnnc.runtime.artifact import compile_model
from cnnc.runtime.model import Model
from cnnc.runtime.onnx_export import BATCH, OPSETS, export_model, ir_version, session

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOLERANCE = 1e-5

# Default run: a sample covering every op kind of the zoo (lenet5: tanh, avgpool; resnet20_cifar and
# cifar_resnet20: residual adds, option-A pad_channels; modern_blocks: SE gate, split, shuffle,
# layernorm, gelu, layer_scale, stochastic_depth, groupnorm, prelu; mobilenet_v2: relu6, dropout;
# efficientnet_b0: silu, sigmoid gate; shufflenet: maxpool, channel slices; squeezenet: flatten,
# concat; googlenet_2014: LRN, ceil-rounded pools; alexnet at -O2: adaptive_avgpool, fused dense;
# densenet121 at -O2: BatchNorm after concat, fused with its relu).
# The rest are minutes on a 2-core machine: CNNC_SLOW=1.
FAST = {("lenet5", 0), ("lenet5", 2), ("cifar_resnet20", 0), ("cifar_resnet20", 2), ("resnet20_cifar", 2),
        ("modern_blocks", 0), ("modern_blocks", 2), ("mobilenet_v2", 0), ("mobilenet_v2", 2),
        ("efficientnet_b0", 0), ("efficientnet_b0", 2), ("shufflenet_v2_x1_0", 0), ("shufflenet_v2_x1_0", 2),
        ("squeezenet1_1", 0), ("squeezenet1_1", 2), ("googlenet_2014", 0), ("googlenet_2014", 2), ("alexnet", 2),
        ("densenet121", 2)}
ZOO = sorted(p.stem for p in EXAMPLES.glob("*.cnn"))
CASES = [pytest.param(name, level, id=f"{name}-O{level}",
                      marks=() if (name, level) in FAST else pytest.mark.slow)
         for name in ZOO for level in (0, 2)]


def randomize_vectors(model: Model, seed: int = 0) -> None:
    """Give every 1-D parameter and buffer (biases, BatchNorm's statistics and affine, LayerNorm's,
    GroupNorm's, PReLU's and layer scale's vectors) random values, so that none is the identity its
    initial value is; weights keep the network's seeded initialisation."""
    rng = np.random.default_rng(seed)
    for k, v in model.params.items():  # NumPy backend: the arrays the executor reads
        if v.ndim != 1:
            continue
        if k.endswith("running_var"):
            v[...] = rng.uniform(0.5, 2.0, v.shape)
        elif k.endswith("weight"):
            v[...] = rng.uniform(0.5, 1.5, v.shape)
        else:
            v[...] = rng.normal(0.0, 0.1, v.shape)


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_matches_numpy(model: Model, level: int, opset: int = 17, batches=(1, 3), scale: float = 1.0) -> None:
    """Export at `level`, check the model as onnx's full checker does, and compare onnxruntime's
    output with the NumPy backend's plan of that level at each batch size."""
    exported = export_model(model, level, opset)
    proto = onnx.load_from_string(exported.to_bytes())
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == ir_version(opset) and proto.opset_import[0].version == opset
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == BATCH and [d.dim_value for d in dims[1:]] == list(model.input_shape)
    ours = model if level == 0 else compile_model(model, level)
    sess = session(exported)
    name = sess.get_inputs()[0].name
    for b in batches:
        x = (scale * np.random.default_rng(b).normal(size=(b, *model.input_shape))).astype(np.float32)
        ref = ours(x)
        (got,) = sess.run(None, {name: x})
        err = relative_error(got, ref)
        assert err <= TOLERANCE, f"{model.name} -O{level} batch {b}: max|Δ|/max|ref| = {err:.2e}"


@pytest.mark.parametrize("name, level", CASES)
def test_zoo_network_exports_and_matches_numpy(name, level):
    model = Model.load(EXAMPLES / f"{name}.cnn")
    randomize_vectors(model)
    assert_matches_numpy(model, level)


def test_default_sample_covers_every_op_of_the_zoo():
    """The default run's networks hold every op kind any zoo network has (at -O0 and at -O2)."""
    from cnnc.backends.base import backend_class
    from cnnc.compiler.pipeline import PassContext, check, optimize

    def ops(name) -> dict[int, set[str]]:
        g = check(EXAMPLES / f"{name}.cnn")
        # BatchNorm folding reads the arrays of the folded op and its producer; zeros do
        folding = {u for n, d in g.nodes(data=True) if OPS[d["op"]].fold for u in (n, *g.pred[n])}
        zeros = {f"{g.nodes[n]['name']}.{s.name}": np.zeros(s.shape, np.float32)
                 for n in folding for s in g.nodes[n].get("param_specs", [])}
        o2 = optimize(g, backend_class("numpy").configure(PassContext(opt_level=2)), zeros)
        return {lv: {d["op"] for _, d in h.nodes(data=True)} for lv, h in ((0, g), (2, o2))}

    found = {name: ops(name) for name in ZOO}
    every = set().union(*(found[n][lv] for n in ZOO for lv in (0, 2)))
    sampled = set().union(*(found[n][lv] for n, lv in FAST))
    assert every - sampled == set()


# ---- every op of the table, on small networks -------------------------------------------------

NETWORKS = {
    # conv geometry: asymmetric pads with ceil rounding, dilation, groups, `same` with stride
    "conv": """
        input 4x11x13
        layers:
            conv 8 3x3 stride=2 pad=(0, 1, 2, 1) dilation=2 round=ceil -> relu
            conv 8 3x3 groups=4 pad=same stride=2 bias=false
            conv 6 2x3 stride=(1, 2) round=floor -> dense 5 flatten=true bias=false
    """,
    # pools: ceil rounding, a last window PyTorch drops, count_pad both ways, adaptive pools
    "pools": """
        input 3x10x10
        layers:
            a = in -> maxpool 3x3 stride=2 round=ceil -> dense 4 flatten=true
            b = in -> avgpool 3x3 stride=2 pad=1 round=ceil -> dense 4 flatten=true
            c = in -> avgpool 3x3 stride=2 pad=1 round=ceil count_pad=false -> dense 4 flatten=true
            d = in -> maxpool 2 round=floor -> maxpool 2x2 stride=2 pad=1 round=ceil
            d = d -> avgpool 2x2 stride=2 pad=1 round=ceil -> dense 4 flatten=true
            e = in -> adaptive_avgpool 3x4 -> dense 4 flatten=true
            f = in -> adaptive_avgpool 5 -> dense 4 flatten=true
            g = in -> avgpool 2x2 pad=(0, 1, 1, 0) round=floor count_pad=false -> dense 4 flatten=true
            h = in -> maxpool 3x3 stride=1 pad=same -> avgpool 3 pad=same -> dense 4 flatten=true
            concat(a, b, c, d, e, f, g, h)
    """,
    # normalisation and channel ops (-O2: the BatchNorm on the input takes its hardswish, fused_bn,
    # and another its residual add and relu)
    "channels": """
        input 8x6x6
        layers:
            x = in -> batchnorm -> hardswish -> lrn 4 alpha=0.01 beta=0.5 k=2
            y = x -> lrn 3 -> batchnorm affine=false -> layernorm affine=false -> groupnorm 4 affine=false
            z = x -> channel_shuffle 4 -> pad_channels 12 stride=2 -> channel_slice 2 10
            w = x -> prelu shared=true -> layer_scale init=0.5 -> pad_channels 8
            g = x -> gap -> hardsigmoid
            r = in -> batchnorm -> add(x) -> relu
            add(y, w, x, r) -> maxpool 2 -> mul(z) -> mul(g) -> softmax
    """,
    # flat tensors: dense, layernorm, groupnorm, prelu, layer_scale, batchnorm on N×F
    "flat": """
        input 3x4x4
        layers:
            flatten -> dense 12 -> batchnorm -> layernorm -> groupnorm 3 -> prelu -> layer_scale
            a, b = in -> flatten -> split 2
            a = a -> relu
            c = b -> sigmoid -> dense 6
            concat(a, b) -> dense 6 bias=false -> mul(c) -> softmax
    """,
}


def _activations_network() -> str:
    """Every element-wise op of the table on one input, then chains of them (-O2 fuses those)."""
    acts = [n for n, op in OPS.items() if op.formula is not None]
    lines = [f"    t{i} = in -> {n}" for i, n in enumerate(acts)]
    return "input 4x5x5\nlayers:\n" + "\n".join(lines) + (
        f"\n    concat({', '.join(f't{i}' for i in range(len(acts)))}) -> gap -> relu -> silu -> tanh"
        " -> gelu -> hardswish -> dense 7 -> elu alpha=0.5 -> leaky_relu 0.2 -> mish\n")


def _network(tmp_path, name: str, body: str) -> Model:
    path = tmp_path / f"{name}.cnn"
    path.write_text(f"network {name}\n" + textwrap.dedent(body))
    model = Model.load(path)
    randomize_vectors(model)
    return model


@pytest.mark.parametrize("name", sorted(NETWORKS) + ["activations"])
@pytest.mark.parametrize("level", [0, 2])
def test_every_op_exports_and_matches_numpy(tmp_path, name, level):
    body = NETWORKS.get(name) or _activations_network()
    # a scale of 4 puts inputs past relu6's 6, hardswish's ±3 and the flat parts of the gates
    assert_matches_numpy(_network(tmp_path, name, body), level, scale=4.0)


def test_ops_test_networks_cover_every_exportable_op(tmp_path):
    from cnnc.backends.base import backend_class
    from cnnc.compiler.pipeline import PassContext, optimize

    seen = set()
    for name in sorted(NETWORKS) + ["activations"]:
        m = _network(tmp_path, name, NETWORKS.get(name) or _activations_network())
        seen |= {d["op"] for _, d in m.graph.nodes(data=True)}
        g = optimize(m.graph, backend_class("numpy").configure(PassContext(opt_level=2)), m.host_params())
        seen |= {d["op"] for _, d in g.nodes(data=True)}
    # layout_transform: the NumPy backend keeps NCHW; it exports as the identity (its shape is unchanged)
    missing = set(OPS) - seen - {"layout_transform", "identity", "dropout", "stochastic_depth"}
    assert missing == set()


@pytest.mark.parametrize("opset", [13, 14, 18, 20, 21, OPSETS[-1]])
def test_opsets_change_the_operators_not_the_values(tmp_path, opset):
    """Below an operator's opset its formula is written (gelu below 20, mish below 18, hardswish
    below 14, LayerNormalization below 17; ReduceMean's axes are an input from 18); every small
    network still gives the NumPy backend's values."""
    for name in sorted(NETWORKS) + ["activations"]:
        model = _network(tmp_path, name, NETWORKS.get(name) or _activations_network())
        for level in (0, 2):
            assert_matches_numpy(model, level, opset, batches=(2,), scale=4.0)
    acts = export_model(_network(tmp_path, "activations", _activations_network()), 0, opset).model
    types = {n.op_type for n in acts.graph.node}
    assert ("Gelu" in types) == (opset >= 20) and ("Mish" in types) == (opset >= 18)
    assert ("HardSwish" in types) == (opset >= 14) and ("Erf" in types) == (opset < 20)
    norm = export_model(_network(tmp_path, "channels", NETWORKS["channels"]), 0, opset).model
    assert ("LayerNormalization" in {n.op_type for n in norm.graph.node}) == (opset >= 17)


def test_written_attributes(tmp_path):
    """pads, ceil_mode and count_include_pad always written; LRN's alpha as written (ONNX divides it
    by size, as we do); Flatten(axis=1), never a Reshape; Gemm transB=1; dropout gone;
    BatchNormalization at -O0, folded into the Conv at -O2; every value has our shape and the
    symbolic batch."""
    model = _network(tmp_path, "attrs", """
        input 3x17x17
        layers:
            conv 8 3x3 stride=2 -> bn -> relu -> lrn 5 alpha=0.002 beta=0.75 k=2
            maxpool 3x3 stride=2 round=ceil -> avgpool 2 -> flatten -> dropout 0.5 -> dense 6 -> relu -> dense 3
    """)
    m0, m2 = (export_model(model, level).model for level in (0, 2))
    nodes = {}
    for n in m0.graph.node:
        nodes.setdefault(n.op_type, []).append({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
    assert "Dropout" not in nodes and "Reshape" not in nodes
    assert nodes["Flatten"] == [{"axis": 1}]
    assert [a["transB"] for a in nodes["Gemm"]] == [1, 1]
    assert nodes["MaxPool"] == [{"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 0, 0], "ceil_mode": 1}]
    assert nodes["AveragePool"] == [{"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0], "ceil_mode": 0,
                                     "count_include_pad": 1}]
    assert nodes["LRN"] == [{"size": 5, "alpha": pytest.approx(0.002), "beta": pytest.approx(0.75),
                             "bias": pytest.approx(2.0)}]
    assert "BatchNormalization" in nodes
    assert "BatchNormalization" not in {n.op_type for n in m2.graph.node}
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m0.graph.value_info) + list(m0.graph.output)}
    g = model.graph
    named = {g.nodes[n]["name"]: g.nodes[n]["shape"] for n in g.nodes if g.nodes[n]["name"] in shapes}
    assert len(named) == 10 and all(shapes[k] == ["N", *v] for k, v in named.items())


def test_unsupported_opset_is_refused():
    model = Model.load(EXAMPLES / "lenet5.cnn")
    for opset in (OPSETS[0] - 1, OPSETS[-1] + 1):
        with pytest.raises(CnncError, match=f"--opset {opset} is not supported"):
            export_model(model, 0, opset)
