"""Compiled artifacts: `cnnc compile` writes one, `cnnc run` executes it without the `.cnn` source.

An artifact is a directory:

    plan.json      the execution plan (format below)
    weights.npz    the parameters by qualified name (no pickle), after rewrites such as BatchNorm folding
    kernels/       generated kernel sources, for backends that generate them

plan.json: {"format": "cnnc-plan", "version": 1, "cnnc_version", "network", "backend",
"opt_level", "mode", "input": node id, "output": node id, "nodes": [{"id", "name", "op",
"attrs" (the op's attributes), "inputs" (node ids in port order), "shape" (without batch),
"pads" (top, bottom, left, right, or null), "layout", "buffer_offset" (bytes into the
activation arena, or null), "source" ("file:line"), "fused_from" (["op name", ...])}, ...] in
execution order, "memory" (the plan_memory figures), "rewrites" (the report lines)}.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
from pydantic import ValidationError

from cnnc.backends.base import Ctx, backend_class, get_backend
from cnnc.compiler.graph import inputs_of
from cnnc.compiler.ops import OPS
from cnnc.compiler.pipeline import PassContext, optimize
from cnnc.dsl.errors import CnncError

from .budget import Estimate, run_estimate, weights_estimate
from .checkpoint import parameters, read_npz, write_npz
from .executor import Executor
from .files import dumps, os_error, read_json, remove_stale_temporaries, write_text_atomic
from .model import Model


def _installed_version() -> str:
    """The installed cnnc's version, read from its metadata (the CLI layer holds `cnnc.__version__`)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("cnnc")
    except PackageNotFoundError:  # run from a source checkout without installing
        return "unknown"


FORMAT = "cnnc-plan"
VERSION = 1


class CompiledModel:
    """An optimised graph, its parameters and an executor on a backend."""

    def __init__(self, graph: nx.MultiDiGraph, params: dict[str, np.ndarray], backend_name: str, meta: dict):
        self.graph = graph
        self.meta = meta
        self.backend = get_backend(backend_name)
        self.plan = self.backend.compile(graph)
        missing = sorted(set(self.plan.param_specs) - set(params))
        if missing:
            raise CnncError(f"weights do not fit the plan: missing {', '.join(missing[:3])}")
        self.params = {k: self.backend.to_device(params[k]) for k in self.plan.param_specs}
        self.executor = Executor(self.plan, self.backend, self.params)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.graph.nodes[self.graph.graph["input"]]["shape"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise CnncError(f"input has shape {x.shape[1:]} per item, the network takes {self.input_shape}")
        if len(x) == 0:
            raise CnncError("the input holds no items")
        run_estimate(self.graph, f"running `{self.meta['network']}` on {len(x)} inputs", len(x)).check(
            "fewer inputs at once")
        out = self.executor.forward(self.backend.to_device(x), Ctx(training=False), keep=False)
        return self.backend.to_host(out)


def compile_graph(model: Model, opt_level: int = 2, backend: str | None = None,
                  ctx: PassContext | None = None):
    """Optimise a checked model for a backend; nothing runs, so no device is needed.
    Returns (graph, host parameters, metadata)."""
    cls = backend_class(backend or model.backend.name)
    ctx = ctx or PassContext()
    ctx.opt_level = opt_level
    cls.configure(ctx)
    weights_estimate(model.graph, f"optimising `{model.name}` (a copy of its weights)").check(
        "fewer filters or units")
    g = optimize(model.graph, ctx, model.host_params())
    meta = {"network": model.name, "backend": cls.name, "opt_level": opt_level, "mode": ctx.mode}
    return g, g.graph["params"], meta


def compile_model(model: Model, opt_level: int = 2, backend: str | None = None, ctx: PassContext | None = None,
                  ) -> CompiledModel:
    """Optimise a checked model for inference and make it runnable on its backend."""
    g, params, meta = compile_graph(model, opt_level, backend, ctx)
    return CompiledModel(g, params, meta["backend"], meta)


def write_artifact(g: nx.MultiDiGraph, params: dict[str, np.ndarray], meta: dict, out: Path) -> list[dict]:
    """Write plan.json, weights.npz and the backend's compiled kernels; returns kernel resource rows."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CnncError(f"{out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create", out) from None
    remove_stale_temporaries(out)  # of a compile killed while writing into this directory
    nodes = []
    for n in sorted(g.nodes):
        d = g.nodes[n]
        nodes.append({"id": n, "name": d["name"], "op": d["op"], "attrs": d["attrs"].model_dump(mode="json"),
                      "inputs": inputs_of(g, n), "shape": list(d["shape"]),
                      "pads": list(d["pads"]) if d.get("pads") else None, "layout": d.get("layout"),
                      "buffer_offset": d.get("buffer_offset"),
                      "source": f"{d['span'].file}:{d['span'].line}" if d.get("span") else None,
                      "fused_from": [f"{op} {name}" for op, name, _ in d.get("fused_from", [])]})
    resources = backend_class(meta["backend"]).build_artifact(g, out / "kernels", meta["mode"] == "training")
    plan = {"format": FORMAT, "version": VERSION, "cnnc_version": _installed_version(), **meta,
            "input": g.graph["input"], "output": g.graph["output"], "nodes": nodes,
            "memory": g.graph.get("memory"), "rewrites": [r.render() for r in g.graph.get("report", [])],
            "kernels": resources}
    write_npz(out / "weights.npz", {f"param/{k}": np.asarray(v) for k, v in params.items()},
              {"kind": "compiled-weights", "network": meta["network"]})
    write_text_atomic(out / "plan.json", dumps(plan, indent=1))
    return resources


def read_artifact(path: Path, backend: str | None = None) -> CompiledModel:
    path = Path(path)
    plan_file = path / "plan.json"
    if not path.is_dir():
        raise CnncError(f"{path} is not a compiled artifact: not a directory", hint="make one with `cnnc compile`")
    if not plan_file.exists():
        raise CnncError(f"{path} is not a compiled artifact: no plan.json", hint="make one with `cnnc compile`")
    plan = read_json(plan_file, "cnnc plan")
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise CnncError(f"{plan_file} is not a cnnc plan")
    if plan.get("version") != VERSION:
        raise CnncError(f"{plan_file} has plan format version {plan.get('version')}; this cnnc "
                        f"({_installed_version()}) reads version {VERSION}", hint="compile the .cnn file again")
    try:
        g = _graph(plan)
    except CnncError as err:
        raise CnncError(f"{plan_file} is corrupt: {err.message}", hint="compile the .cnn file again") from None
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        text = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        raise CnncError(f"{plan_file} is corrupt: {text}", hint="compile the .cnn file again") from None
    weights_file = path / "weights.npz"
    arrays, meta = read_npz(weights_file)
    if meta.get("network") != plan.get("network"):
        raise CnncError(f"{weights_file} holds weights of `{meta.get('network')}`, the plan is "
                        f"`{plan.get('network')}`")
    params = parameters(arrays, weights_file)
    for k, spec in ((k, s) for n in g.nodes for k, s in _specs(g, n)):
        if k in params and tuple(params[k].shape) != tuple(spec.shape):
            raise CnncError(f"{weights_file}: `{k}` has shape {params[k].shape}, the plan needs {spec.shape}")
    meta = {k: plan.get(k) for k in ("network", "backend", "opt_level", "mode")}
    name = backend or plan.get("backend")
    if not isinstance(name, str):
        raise CnncError(f"{plan_file} is corrupt: no backend named")
    cls = backend_class(name)
    if hasattr(cls, "load_artifact_kernels"):
        cls.load_artifact_kernels(path / "kernels")
    return CompiledModel(g, params, name, meta)


def _specs(g, n):
    d = g.nodes[n]
    return [(f"{d['name']}.{s.name}", s) for s in d.get("param_specs", [])]


def _graph(plan: dict) -> nx.MultiDiGraph:
    """The plan's nodes as a graph, every field checked: ops known, inputs earlier nodes, shapes
    following from the inputs by the op table's rules."""
    from cnnc.compiler.passes import count

    g = nx.MultiDiGraph()
    nodes = plan["nodes"]
    if not isinstance(nodes, list) or not nodes:
        raise ValueError("`nodes` is not a list of nodes")
    for i, item in enumerate(nodes):
        if not isinstance(item, dict):
            raise ValueError(f"node {i} is not an object")
        n = item["id"]
        if not isinstance(n, int) or isinstance(n, bool) or n in g:
            raise ValueError(f"node {i}: id {n!r} is not a new integer")
        op = OPS.get(item["op"]) if isinstance(item["op"], str) else None
        if op is None:
            raise ValueError(f"node {n}: unknown op {item['op']!r}")
        if not isinstance(item["attrs"], dict):
            raise ValueError(f"node {n}: attrs are not an object")
        attrs = op.attrs(**item["attrs"])
        inputs, shape = item["inputs"], item["shape"]
        if not isinstance(inputs, list) or not all(isinstance(u, int) and u in g for u in inputs):
            raise ValueError(f"node {n}: inputs {inputs!r} are not earlier nodes")
        lo, hi = op.inputs
        if len(inputs) < lo or (hi is not None and len(inputs) > hi):
            raise ValueError(f"node {n}: {len(inputs)} inputs, {op.name} takes {lo} to {hi if hi is not None else 'any'}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                  for d in shape):
            raise ValueError(f"node {n}: shape {shape!r} is not a list of positive integers")
        pads = item.get("pads")
        if pads is not None and (not isinstance(pads, list) or len(pads) != 4
                                 or not all(isinstance(v, int) and v >= 0 for v in pads)):
            raise ValueError(f"node {n}: pads {pads!r} are not four non-negative integers")
        g.add_node(n, op=item["op"], attrs=attrs, name=str(item["name"]), shape=tuple(shape),
                   pads=tuple(pads) if pads else None, layout=item.get("layout"))
        for port, u in enumerate(inputs):
            g.add_edge(u, n, port=port)
    for n in g.nodes:
        d = g.nodes[n]
        ins = [g.nodes[u]["shape"] for u in inputs_of(g, n)]
        if tuple(OPS[d["op"]].shape(d["attrs"], ins)) != d["shape"]:  # the input's rule gives its dims
            raise ValueError(f"node {d['name']}: shape {d['shape']} does not follow from its inputs")
    g.graph["input"], g.graph["output"] = plan["input"], plan["output"]
    g.graph["network"] = str(plan["network"])
    if g.graph["input"] not in g or g.graph["output"] not in g:
        raise ValueError("input or output node missing")
    if [n for n in g if OPS[g.nodes[n]["op"]].inputs == (0, 0)] != [g.graph["input"]]:
        raise ValueError("a plan has exactly one input node, and it is the plan's input")
    count(g, 1)  # parameters and sizes, for the weights check and the memory estimate
    return g


def read_input(path: str | Path, item_shape: tuple[int, ...]) -> np.ndarray:
    """A .npy array of inputs (or one item), its dtype, shape and size checked before it is read
    into memory, as float32; a CnncError naming the file otherwise."""
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CnncError(f"no such input file: {path}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise CnncError(f"cannot read {path} as a .npy array: {exc}") from None
    if not isinstance(x, np.ndarray):
        raise CnncError(f"{path} is an .npz archive; --input takes one .npy array")
    if x.dtype.kind not in "fiub":
        raise CnncError(f"{path} holds {x.dtype} values; the network takes real numbers")
    if x.ndim == len(item_shape):
        x = x[None]
    if x.shape[1:] != tuple(item_shape):
        raise CnncError(f"{path} has items of shape {tuple(x.shape[1:])}; the network takes {tuple(item_shape)}")
    Estimate(f"reading {path}", [("input", int(x.size) * 4)]).check("a smaller input file")
    with np.errstate(all="ignore"):
        x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CnncError(f"{path} holds values that are not finite float32 numbers (NaN, inf, or beyond ±3.4e38)")
    return x


def save_output(path: str | Path, y: np.ndarray) -> None:
    """Outputs as .npy, written in place (the path may be a pipe or a device); on failure a
    partial regular file is removed and the error says why."""
    path = Path(path)
    try:
        with open(path, "wb") as f:
            np.save(f, y)
    except OSError as exc:
        if path.is_file() and not path.is_symlink():
            path.unlink()
        raise os_error(exc, "write", path) from None
