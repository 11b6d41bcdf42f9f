"""Shared by the ONNX tests: the onnx wheel's model-zoo networks with seeded random weights, and
onnxruntime as the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ort.set_default_logger_severity(3)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.reshape(b.shape) - b).max() / max(np.abs(b).max(), 1e-30))


def with_random_weights(model, seed: int = 0):
    """The model with seeded random weights in place of its constants (ConstantOfShape 0.02 fills),
    scaled by role so activations stay moderate: He-normal conv and dense weights, BatchNorm and
    per-channel scales in [0.5, 1.5], biases and means N(0, 0.1²). The last Softmax is cut off, so
    that the logits are compared (a saturated softmax would hide differences)."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    nodes = []
    for n in g.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in consts:
            consts[n.output[0]] = np.zeros(consts[n.input[0]].astype(np.int64), np.float32)
        else:
            nodes.append(n)
    role = {}
    for n in nodes:
        for k, v in enumerate(n.input):
            role.setdefault(v, (n, k))
    out = {}
    for name, a in consts.items():
        if a.dtype != np.float32 or name not in role:
            out[name] = a
            continue
        n, k = role[name]
        if n.op_type in ("Conv", "Gemm") and k == 1:
            trans_b = any(at.name == "transB" and at.i for at in n.attribute)
            fan_in = a.shape[1] if n.op_type == "Gemm" and trans_b else \
                a.shape[0] if n.op_type == "Gemm" else int(np.prod(a.shape[1:]))
            v = rng.normal(size=a.shape) * np.sqrt(2.0 / fan_in)
        elif (n.op_type == "BatchNormalization" and k in (1, 4)) or n.op_type == "Mul":
            v = rng.uniform(0.5, 1.5, size=a.shape)
        else:
            v = rng.normal(size=a.shape) * 0.1
        out[name] = v.astype(np.float32)
    if nodes[-1].op_type == "Softmax":
        g.output[0].name = nodes[-1].input[0]
        nodes.pop()
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in out.items())
    inputs = [i for i in g.input if i.name not in out]
    del g.input[:]
    g.input.extend(inputs)
    m.ir_version = max(m.ir_version, 4)  # initializers no longer listed as inputs
    return m


def ort_run(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0] == 1  # the zoo's inputs are 1×…: run one image at a time
    if fixed:
        return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {name: x})[0]
