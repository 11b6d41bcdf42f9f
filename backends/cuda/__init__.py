"""The CUDA backend: CuPy arrays on an NVIDIA GPU, convolutions in our own CUDA C kernels.

Every kernel is a template in `kernels/` specialised per problem (shapes, attributes and tile
configuration as #defines, so loops unroll). `cnnc compile --backend cuda` generates and
compiles them for sm_90 with nvcc ahead of time, on a machine with or without a GPU, into the
artifact (`kernels/kernels.cu`, `kernels/kernels.cubin`, `kernels/resources.json`); at run time
kernels come from that cubin or, for plans built in the process, from NVRTC through CuPy.
Convolutions never call cuDNN or cuBLAS; dense layers use cuBLAS through `cupy.matmul`.
Plans compute in fp32, or in tf32, bf16 or fp16 (`precision.py`: convolutions on the tensor cores).
CuPy is imported only when the backend is instantiated (`pip install 'cnnc[cuda]'`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnc.backends.base import Backend, NodeInfo
from cnnc.compiler.ops import OPS
from cnnc.compiler.graph import inputs_of

from . import conv, device, nvcc, ops
from . import precision as precision_mod
from . import channel_ops
from . import elementwise as ew
from .source import translation_unit

KERNELS = {**ops.KERNELS, **conv.KERNELS}  # every op with an element-wise formula runs ops.ELEMENTWISE
KERNELS.update(channel_ops.KERNELS)  # the channel and normalisation ops of modern blocks


def node_infos(g):
    for n in sorted(g.nodes):
        d = g.nodes[n]
        if n == g.graph["input"]:
            continue
        srcs = inputs_of(g, n)
        yield NodeInfo(n, d["name"], d["op"], d["attrs"], tuple(g.nodes[u]["shape"] for u in srcs), d["shape"],
                       d.get("pads"))


def train_precision(g) -> str:
    """The precision the graph's `train:` section computes in (fp32 without one)."""
    train = g.graph.get("train")
    return getattr(train, "precision", "fp32") if train is not None else "fp32"


def specs_for_graph(g, training: bool = False, precision: str | None = None) -> list:
    """Every kernel specialisation a plan of this graph runs (its losses and optimizer updates
    too when training), deduplicated. A training plan in a reduced precision (`precision`, by
    default the `train:` section's) also runs its matmuls' kernels in that precision."""
    precision = precision or (train_precision(g) if training else "fp32")
    specs = []
    for node in node_infos(g):
        family = conv if node.op in conv.KERNELS else channel_ops if node.op in channel_ops.KERNELS else ops
        specs += family.specs(node, training)
        if precision != "fp32" and OPS[node.op].kind in precision_mod.MATMUL_KINDS:
            specs += precision_mod.specs(node, training, precision)
    if training:
        from . import optim
        specs += ops.loss_specs() + optim.specs()
    seen, out = set(), []
    for s in specs:
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


class CudaBackend(Backend):
    name = "cuda"
    fused_ops = frozenset({"fused_conv", "fused_dense", "fused_bn", "fused_mul", "elemwise_chain", "layout_transform"})
    fused_without_residual = frozenset({"fused_bn"})  # its BatchNorm and activation kernels, no add
    kernels = KERNELS
    elementwise = ops.ELEMENTWISE
    precisions = frozenset({"fp32", *conv.MMA_CODES})  # reduced ones: precision.py

    @classmethod
    def fusion_refusal(cls, target: str, ops_: tuple[str, ...]) -> str | None:
        """The base answer, after what the generated kernels cannot do: chains longer than the
        chain kernel takes, formulas with more parameters than the device functions take."""
        elementwise = [op for op in ops_ if op in OPS and OPS[op].formula is not None]
        if len(elementwise) > ops.MAX_CHAIN:  # only a chain holds more than one
            return f"a chain of {len(elementwise)} ops is longer than the CUDA chain kernel's {ops.MAX_CHAIN}"
        for op in elementwise:
            why = ew.refusal(op)
            if why is not None:
                return why
        return super().fusion_refusal(target, ops_)

    def __init__(self) -> None:
        self.cp = device.cupy()  # a clear error without CuPy or a GPU

    def to_device(self, host):
        a = np.asarray(host)
        if a.dtype.kind not in "iub":
            a = a.astype(np.float32, copy=False)
        return self.cp.asarray(np.ascontiguousarray(a))

    def to_host(self, a) -> np.ndarray:
        return self.cp.asnumpy(a)

    def zeros(self, shape, dtype="float32"):
        return self.cp.zeros(shape, dtype=dtype)

    def loss(self, name: str):
        from cnnc.dsl.errors import CnncError
        try:
            return ops.LOSSES[name]
        except KeyError:
            raise CnncError(f"backend `cuda` has no loss `{name}`", hint="known: " + ", ".join(ops.LOSSES)) from None

    @staticmethod
    def make_optimizer(config, params, lr_mult=None, decay_mult=None):
        from . import optim
        return optim.make_optimizer(config, params, lr_mult, decay_mult)

    def precision_plan(self, plan, precision: str):
        """The plan computing in `precision` (precision.py), its kernels compiled ahead of the
        first step as `compile` does for float32."""
        self.check_precision(precision)
        if precision != "fp32" and plan.graph is not None:
            device.prebuild(specs_for_graph(plan.graph, training=True, precision=precision))
        return precision_mod.precision_plan(plan, precision)

    def compile(self, g):
        """Bind the plan, then compile every kernel it may launch (training ones too) ahead of
        the first step: nvcc in parallel when it is installed, else NVRTC on first launch."""
        plan = super().compile(g)
        device.prebuild(specs_for_graph(g, training=True))
        return plan

    @classmethod
    def build_artifact(cls, graph, out_dir, training: bool = False) -> list[dict]:
        """Generate the plan's specialised kernels and compile them for sm_90 with nvcc."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        specs = specs_for_graph(graph, training)
        source = translation_unit(specs)
        (out / "kernels.cu").write_text(source, encoding="utf-8")
        resources = [r.to_dict() for r in nvcc.compile_cubin(source, out / "kernels.cubin")]
        (out / "resources.json").write_text(json.dumps({"arch": nvcc.ARCH, "keys": [s.key for s in specs],
                                                        "kernels": resources}, indent=1), encoding="utf-8")
        return resources

    @classmethod
    def load_artifact_kernels(cls, kernel_dir) -> None:
        kernel_dir = Path(kernel_dir)
        info = json.loads((kernel_dir / "resources.json").read_text(encoding="utf-8"))
        device.use_cubin(info["keys"], kernel_dir / "kernels.cubin")
