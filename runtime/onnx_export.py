"""`cnnc export`: a network as an ONNX model, checked by onnx before it is written.

The graph of the chosen optimisation level is written node by node from the op table's ONNX
rules (compiler/ops.py `onnx_export`, described through compiler/onnx_desc.py), which this
module renders with onnx.helper. At -O0 the graph is as written (BatchNorm in inference form);
at -O2 the optimised inference graph (BatchNorm folded, fused ops as Conv + Add + activation).
Ops that are the identity at inference (dropout, stochastic depth) are left out. The batch is
the symbolic dimension "N"; every value carries our inferred shape (value_info and the graph
output), which must equal what onnx's strict shape inference finds, and the model must pass
onnx's full checker: either failing is a bug in cnnc (InternalError), never written out.

onnx and onnxruntime are the optional extra `[onnx]`, imported only here, only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnc.compiler.graph import inputs_of
from cnnc.compiler.onnx_desc import OnnxEmitter, emit
from cnnc.dsl.errors import CnncError, InternalError

from .artifact import _installed_version, compile_graph
from .files import write_atomic
from .model import Model

DEFAULT_OPSET = 17
# 13: Softmax normalises one axis (below, it flattened the trailing axes); 22: the newest opset both
# onnx's checker and onnxruntime run every op we write in
OPSETS = range(13, 23)
BATCH = "N"  # the symbolic batch dimension
PROTOBUF_LIMIT = 2**31 - 2**24  # a serialized protobuf message is at most 2 GiB; some room for the graph


def need_onnx(what: str = "`cnnc export`"):
    """The onnx module, or a CnncError saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise CnncError(f"{what} needs the onnx package", hint="pip install 'cnnc[onnx]'") from None
    return onnx


def ir_version(opset: int) -> int:
    """The IR version of the first onnx release with `opset` (IR 8 for opset 17): onnx stamps its
    own newest IR by default, which runtimes older than it refuse."""
    from onnx import helper
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=False)


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise CnncError(f"--opset {opset} is not supported: cnnc exports opsets {OPSETS[0]} to {OPSETS[-1]}",
                        hint=f"the default is {DEFAULT_OPSET}; below 13 Softmax flattens its input and "
                             "cnnc does not write that form")


@dataclass
class Exported:
    model: object  # onnx.ModelProto
    opset: int
    nodes: int
    parameters: int  # weight elements written as initializers

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()


def export_model(model: Model, opt_level: int = 0, opset: int = DEFAULT_OPSET, weights: str = "") -> Exported:
    """`model` (its current weights) at optimisation level `opt_level` as a checked ONNX model;
    `weights` says where they came from (kept in the model's metadata)."""
    check_opset(opset)
    need_onnx()
    g, params, _ = compile_graph(model, opt_level, "numpy")
    return export_graph(g, params, opset, {"cnnc.opt_level": str(opt_level), "cnnc.weights": weights})


def export_graph(g, params: dict[str, np.ndarray], opset: int, metadata: dict[str, str] | None = None) -> Exported:
    """A checked graph and its parameters (host arrays by qualified name) as a checked ONNX model."""
    onnx = need_onnx()
    from onnx import helper, numpy_helper

    E = OnnxEmitter(opset)
    values: dict[int, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # our shape of each value we name after a node
    inp, outp = g.graph["input"], g.graph["output"]
    for n in sorted(g.nodes):  # ids are a topological order
        d = g.nodes[n]
        if n == inp:
            values[n] = d["name"]
            continue
        ins = inputs_of(g, n)
        node = {**d, "in_shapes": [tuple(g.nodes[u]["shape"]) for u in ins]}
        own = {s.name: params[f"{d['name']}.{s.name}"] for s in d.get("param_specs", [])}
        E.begin(d["name"], own)
        start = len(E.nodes)
        out = emit(E, d["op"], d["attrs"], node, [values[u] for u in ins])
        if any(out in x.outputs for x in E.nodes[start:]):
            _rename(E.nodes[start:], out, d["name"])  # the node's result carries its name
            out = d["name"]
            shapes[out] = tuple(d["shape"])
        values[n] = out
    out_name = values[outp]
    if out_name == values[inp]:  # nothing but pass-throughs: ONNX needs a node between them
        E.begin(g.nodes[outp]["name"], {})
        out_name = E.node("Identity", [out_name])
        shapes[out_name] = tuple(g.nodes[outp]["shape"])

    size = sum(v.nbytes for v in E.initializers.values())
    if size > PROTOBUF_LIMIT:
        raise CnncError(f"`{g.graph['network']}` has {size / 2**30:.1f} GiB of weights: an ONNX file holds at most "
                        "2 GiB without external data files, which cnnc export does not write")

    def info(name, shape):
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [BATCH, *shape])

    nodes = [helper.make_node(x.op_type, x.inputs, x.outputs, name=x.name, **x.attrs) for x in E.nodes]
    inits = [numpy_helper.from_array(v, name) for name, v in E.initializers.items()]
    graph = helper.make_graph(nodes, g.graph["network"], [info(values[inp], g.nodes[inp]["shape"])],
                              [info(out_name, g.nodes[outp]["shape"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version(opset),
                              producer_name="cnnc", producer_version=_installed_version(),
                              doc_string=f"network {g.graph['network']}, exported by cnnc")
    helper.set_model_props(model, {"cnnc.network": g.graph["network"], **(metadata or {})})
    _validate(onnx, model, shapes, out_name)
    model.graph.value_info.extend(info(name, s) for name, s in shapes.items() if name != out_name)
    return Exported(model, opset, len(nodes), sum(int(v.size) for v in E.initializers.values()))


def _rename(nodes, old: str, new: str) -> None:
    for x in nodes:
        x.inputs = [new if v == old else v for v in x.inputs]
        x.outputs = [new if v == old else v for v in x.outputs]


def _dims(value_info) -> tuple:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def _validate(onnx, model, shapes: dict[str, tuple[int, ...]], out_name: str) -> None:
    """onnx's full checker, then strict shape inference, whose shapes must be ours."""
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InternalError(f"the ONNX model of `{model.graph.name}` fails onnx's check: {exc}") from None
    found = {v.name: _dims(v) for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name, shape in shapes.items():
        want = (BATCH, *shape)
        if found.get(name) != want:
            raise InternalError(f"ONNX value `{name}` of `{model.graph.name}`: onnx infers the shape "
                                f"{found.get(name)}, cnnc {want}")


def weights_note(model: Model, checkpoint: str | None) -> str:
    if checkpoint:
        return f"weights from {checkpoint}"
    if model.graph.graph.get("weights"):  # an imported ONNX model brings its own
        return f"the weights in {model.path}"
    return f"the network's initial weights (seed {model.config.seed}; no --checkpoint given)"


def write_onnx(exported: Exported, path: str | Path) -> None:
    """Write the model to `path` atomically; its directory must exist."""
    path = Path(path)
    check_output(path)
    write_atomic(path, lambda f: f.write(exported.to_bytes()))


def check_output(path: str | Path) -> None:
    """Refuse an output path whose directory is missing (a mistyped path, not one to create)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise CnncError(f"cannot write {path}: directory {parent} does not exist",
                        hint=f"create it first (mkdir -p {parent}) or choose another -o")
    if path.is_dir():
        raise CnncError(f"cannot write {path}: it is a directory", hint="give a file name, like model.onnx")


def session(exported: Exported, threads: int | None = None):
    """An onnxruntime CPU session on the exported model (`threads`: intra-op threads)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CnncError("running an exported model needs onnxruntime", hint="pip install 'cnnc[onnx]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers are not the user's business
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(exported.to_bytes(), opts, providers=["CPUExecutionProvider"])


__all__ = ["DEFAULT_OPSET", "OPSETS", "Exported", "check_output", "export_graph", "export_model", "session",
           "weights_note", "write_onnx"]
