"""The backend interface, and the registry that finds backends through entry points.

A backend turns a checked graph into an executable `Plan` and supplies, per op of the op
table, one forward and one backward kernel; the runtime drives them (autodiff, training).

    Backend.name                  what `--backend NAME` selects
    Backend.fused_ops             fused kernels the fusion passes may ask for
    Backend.fused_without_residual  those of them that take no residual (shortcut) input
    Backend.fusion_refusal(target, ops)
                                  the capability query: None when the backend runs `target`
                                  (fused_conv, fused_dense, fused_mul, elemwise_chain) made of the op-table
                                  ops `ops`, else the reason it does not (a refusal in --report)
    Backend.elementwise           the Kernel that runs every op with an element-wise formula
    Backend.precisions            the `train: precision=` values it computes in (fp32 at least);
                                  check_precision(p) refuses the others with a CnncError naming the
                                  setting, precision_plan(plan, p) binds a plan to compute in p
    Backend.to_device(host)       host → device array (float32 unless integer)
    Backend.to_host(a)            device → host numpy array
    Backend.zeros(shape, dtype)
    Backend.kernel(op) -> Kernel  forward/backward pair for an op-table op (`kernels[op]`, or
                                  `elementwise` for an op the table gives a formula)
    Backend.loss(name) -> fn      "cross_entropy" or "mse": fn(out, target) -> (loss, d out)
    Backend.compile(graph)        -> Plan: ordered steps over the graph
    Backend.pass_scope(batch)     the context each forward or backward pass runs in (default: none)

A kernel's forward takes `(node, xs, params, ctx)` and returns `(y, saved)`; its backward
takes `(node, saved, dy, params, ctx)` and returns `(dxs, dparams)`: one input gradient per
input (None where an input needs none) and a dict of parameter gradients by parameter name.
Kernels never modify their inputs or `dy` in place: the runtime may hand the same array to
several consumers. `node` is a `NodeInfo`; `params` maps the op's parameter names (op table
`ParamSpec`: weight, bias, running_mean, running_var) to device arrays, buffers included
(BatchNorm updates its running statistics in place when `ctx.training`). Third-party backends
register a zero-argument factory under the entry-point group `cnnc.backends`.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import numpy as np

from cnnc.compiler.graph import inputs_of
from cnnc.compiler.ops import OPS
from cnnc.compiler.train_config import PRECISIONS
from cnnc.dsl.errors import CnncError

from . import optim_rules

ENTRY_POINT_GROUP = "cnnc.backends"


@dataclass(frozen=True)
class NodeInfo:
    """What a kernel may know about its node: static, so kernels can be specialised on it."""

    id: int
    name: str
    op: str
    attrs: Any
    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    pads: tuple[int, int, int, int] | None = None
    # a kernel's decisions for this node that depend only on it and its inputs' shapes (a conv's
    # algorithm), kept so that they are made once, not at every call; a copy (dataclasses.replace)
    # starts its own
    memo: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)


@dataclass
class Ctx:
    """Per-call state: training or inference, and the seeded generator dropout draws from."""

    training: bool = False
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    # False while a backward kernel runs on the network's input: nothing needs that gradient, so
    # a kernel may return None for it (the first conv then skips its col2im entirely)
    need_input_grad: bool = True
    # Synchronised BatchNorm (data-parallel training): sums a float64 vector over the ranks, so
    # training-mode statistics and their gradients cover the global batch; None: this batch only
    bn_reduce: Callable | None = None


@dataclass(frozen=True)
class Kernel:
    forward: Callable
    backward: Callable


@dataclass(frozen=True)
class Step:
    """One node of the plan: run `kernel` on the outputs of `inputs` with the node's parameters."""

    node: NodeInfo
    kernel: Kernel
    inputs: tuple[int, ...]
    params: tuple[str, ...]  # qualified names: f"{node.name}.{param}"


@dataclass
class Plan:
    """Steps in execution order, the input and output node ids, and every parameter's spec."""

    steps: list[Step]
    input: int
    output: int
    param_specs: dict[str, Any]  # qualified name → ParamSpec (shape, buffer flag)
    graph: Any = None


class Backend(abc.ABC):
    """Base class with the shared compile step; subclasses supply arrays, losses and kernels."""

    name = "base"
    fused_ops: frozenset[str] = frozenset()
    fused_without_residual: frozenset[str] = frozenset()  # fused kernels that take no residual input
    layouts: dict[str, str] = {}  # op → the layout its kernel reads (default NCHW)
    kernels: dict[str, Kernel] = {}
    elementwise: Kernel | None = None
    precisions: frozenset[str] = frozenset({"fp32"})

    @staticmethod
    def make_optimizer(config, params: dict, lr_mult: dict | None = None, decay_mult: dict | None = None):
        """The optimizer a training loop steps over these parameters (the backend's arrays): the
        rule of optim_rules.make_optimizer, on NumPy arrays; a backend overrides it to run the
        update on its device (CUDA) or in compiled code (the NumPy backend's C SGD)."""
        return optim_rules.make_optimizer(config, params, lr_mult, decay_mult)

    def pass_scope(self, batch: int):
        """The context one forward or backward pass over `batch` images runs in (the executor
        enters it): nothing by default; the NumPy backend hands its threads to BLAS for batches
        smaller than its thread count where its split gemms (cgemm.py) are off."""
        return contextlib.nullcontext()

    @classmethod
    def check_precision(cls, precision: str, where: str = "") -> None:
        """Refuse a precision this backend does not compute in: a CnncError naming the setting
        (`where`: the file or run the setting comes from, for the message)."""
        if precision not in cls.precisions:
            known = ", ".join(p for p in PRECISIONS if p in cls.precisions)
            raise CnncError(f"{where + ': ' if where else ''}backend `{cls.name}` does not compute in {precision} "
                            f"(train setting `precision={precision}`, or --precision); it computes in {known}",
                            hint=f"train with `precision=fp32`, or on a backend that has {precision}"
                                 + (" (numpy emulates it)" if cls.name != "numpy" else ""))

    def precision_plan(self, plan: Plan, precision: str) -> Plan:
        """The plan computing in `precision`; backends with more than fp32 override it."""
        self.check_precision(precision)
        return plan

    @classmethod
    def fusion_refusal(cls, target: str, ops: tuple[str, ...]) -> str | None:
        """Why this backend cannot run `target` fused from `ops`, or None when it can. The base
        answer: it can when it has the fused kernel (the passes only offer ops whose formulas the
        epilogues render)."""
        if target not in cls.fused_ops:
            return f"backend `{cls.name}` has no {target} kernel"
        if target in cls.fused_without_residual and any(op in OPS and OPS[op].residual_fusable for op in ops):
            return f"backend `{cls.name}`'s {target} kernels take no residual input"
        return None

    @classmethod
    def build_artifact(cls, graph, out_dir, training: bool = False) -> list[dict]:
        """Generate and compile whatever kernels the plan needs into out_dir (ahead of time, no
        device needed); returns per-kernel resource rows for reports. Backends without generated
        kernels have nothing to do."""
        return []

    @abc.abstractmethod
    def to_device(self, host: np.ndarray):
        """Copy a host array to the device (float32 unless it holds integers)."""

    @abc.abstractmethod
    def to_host(self, a) -> np.ndarray:
        """Copy a device array to the host."""

    @abc.abstractmethod
    def zeros(self, shape, dtype="float32"):
        """A zero-filled device array."""

    @abc.abstractmethod
    def loss(self, name: str):
        """`fn(out, target, **options) -> (mean loss as float, d loss / d out)`."""

    @classmethod
    def configure(cls, ctx):
        """Point a compiler PassContext at this backend: its name, fused ops, capability query
        and preferred layouts. Returns ctx."""
        ctx.backend_name = cls.name
        ctx.fused_ops = cls.fused_ops
        ctx.fusion_check = cls.fusion_refusal
        ctx.layouts = dict(cls.layouts)
        return ctx

    def kernel(self, op: str) -> Kernel:
        found = self.kernels.get(op)
        if found is None and self.elementwise is not None and op in OPS and OPS[op].formula is not None:
            found = self.elementwise
        if found is None:
            raise CnncError(f"backend `{self.name}` has no kernel for `{op}`")
        return found

    def compile(self, g) -> Plan:
        """Order the graph's nodes (ids are topological) and bind each to its kernel."""
        steps, specs = [], {}
        for n in sorted(g.nodes):
            d = g.nodes[n]
            srcs = inputs_of(g, n)
            node = NodeInfo(n, d["name"], d["op"], d["attrs"], tuple(g.nodes[u]["shape"] for u in srcs),
                            d["shape"], d.get("pads"))
            names = []
            for spec in d.get("param_specs", []):
                qualified = f"{d['name']}.{spec.name}"
                specs[qualified] = spec
                names.append(qualified)
            if n == g.graph["input"]:
                continue
            steps.append(Step(node, self.kernel(d["op"]), tuple(srcs), tuple(names)))
        return Plan(steps, g.graph["input"], g.graph["output"], specs, g)


def available() -> dict[str, metadata.EntryPoint]:
    """Installed backends by name (entry-point group `cnnc.backends`)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_class(name: str) -> type[Backend]:
    """The backend's class, without starting it: what compiling for a device that is absent needs."""
    eps = available()
    if name not in eps:
        raise CnncError(f"unknown backend `{name}`; installed: {', '.join(sorted(eps)) or 'none'}",
                        hint="backends register under the entry-point group `cnnc.backends`")
    return eps[name].load()


def get_backend(name: str) -> Backend:
    return backend_class(name)()
