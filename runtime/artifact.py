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

import json
from pathlib import Path

import networkx as nx
import numpy as np
from pydantic import ValidationError

from cnnc import __version__
from cnnc.backends.base import Ctx, backend_class, get_backend
from cnnc.compiler.graph import inputs_of
from cnnc.compiler.ops import OPS
from cnnc.compiler.pipeline import PassContext, optimize
from cnnc.dsl.errors import CnncError

from .checkpoint import read_npz, write_npz
from .executor import Executor
from .model import Model

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
        out = self.executor.forward(self.backend.to_device(x), Ctx(training=False), keep=False)
        return self.backend.to_host(out)


def compile_graph(model: Model, opt_level: int = 2, backend: str | None = None,
                  ctx: PassContext | None = None):
    """Optimise a checked model for a backend; nothing runs, so no device is needed.
    Returns (graph, host parameters, metadata)."""
    cls = backend_class(backend or model.backend.name)
    ctx = ctx or PassContext()
    ctx.opt_level = opt_level
    ctx.backend_name = cls.name
    ctx.fused_ops = cls.fused_ops
    ctx.layouts = dict(cls.layouts)
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
    nodes = []
    for n in sorted(g.nodes):
        d = g.nodes[n]
        nodes.append({"id": n, "name": d["name"], "op": d["op"], "attrs": d["attrs"].model_dump(mode="json"),
                      "inputs": inputs_of(g, n), "shape": list(d["shape"]),
                      "pads": list(d["pads"]) if d.get("pads") else None, "layout": d.get("layout"),
                      "buffer_offset": d.get("buffer_offset"),
                      "source": f"{d['span'].file}:{d['span'].line}" if d.get("span") else None,
                      "fused_from": [f"{op} {name}" for op, name, _ in d.get("fused_from", [])]})
    out.mkdir(parents=True, exist_ok=True)
    resources = backend_class(meta["backend"]).build_artifact(g, out / "kernels", meta["mode"] == "training")
    plan = {"format": FORMAT, "version": VERSION, "cnnc_version": __version__, **meta,
            "input": g.graph["input"], "output": g.graph["output"], "nodes": nodes,
            "memory": g.graph.get("memory"), "rewrites": [r.render() for r in g.graph.get("report", [])],
            "kernels": resources}
    write_npz(out / "weights.npz", {f"param/{k}": np.asarray(v) for k, v in params.items()},
              {"kind": "compiled-weights", "network": meta["network"]})
    tmp = out / ".plan.json.tmp"
    tmp.write_text(json.dumps(plan, indent=1), encoding="utf-8")
    tmp.replace(out / "plan.json")
    return resources


def read_artifact(path: Path, backend: str | None = None) -> CompiledModel:
    path = Path(path)
    plan_file = path / "plan.json"
    if not plan_file.exists():
        raise CnncError(f"{path} is not a compiled artifact: no plan.json", hint="make one with `cnnc compile`")
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CnncError(f"{plan_file} is corrupt: {exc}") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise CnncError(f"{plan_file} is not a cnnc plan")
    if plan.get("version") != VERSION:
        raise CnncError(f"{plan_file} has plan format version {plan.get('version')}; this cnnc "
                        f"({__version__}) reads version {VERSION}", hint="compile the .cnn file again")
    try:
        g = _graph(plan)
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise CnncError(f"{plan_file} is corrupt: {exc.__class__.__name__}: {exc}".splitlines()[0]) from None
    arrays, meta = read_npz(path / "weights.npz")
    if meta.get("network") != plan.get("network"):
        raise CnncError(f"{path / 'weights.npz'} holds weights of `{meta.get('network')}`, the plan is "
                        f"`{plan.get('network')}`")
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    for k, spec in ((k, s) for n in g.nodes for k, s in _specs(g, n)):
        if k in params and tuple(params[k].shape) != tuple(spec.shape):
            raise CnncError(f"{path / 'weights.npz'}: `{k}` has shape {params[k].shape}, the plan needs {spec.shape}")
    meta = {k: plan[k] for k in ("network", "backend", "opt_level", "mode")}
    cls = backend_class(backend or plan["backend"])
    if hasattr(cls, "load_artifact_kernels"):
        cls.load_artifact_kernels(path / "kernels")
    return CompiledModel(g, params, backend or plan["backend"], meta)


def _specs(g, n):
    d = g.nodes[n]
    return [(f"{d['name']}.{s.name}", s) for s in d.get("param_specs", [])]


def _graph(plan: dict) -> nx.MultiDiGraph:
    g = nx.MultiDiGraph()
    for item in plan["nodes"]:
        op = OPS[item["op"]]
        attrs = op.attrs(**item["attrs"])
        g.add_node(item["id"], op=item["op"], attrs=attrs, name=item["name"], shape=tuple(item["shape"]),
                   pads=tuple(item["pads"]) if item["pads"] else None, layout=item.get("layout"))
        for port, u in enumerate(item["inputs"]):
            g.add_edge(u, item["id"], port=port)
    for n in g.nodes:
        d = g.nodes[n]
        ins = [g.nodes[u]["shape"] for u in inputs_of(g, n)]
        if d["op"] != "input" and tuple(OPS[d["op"]].shape(d["attrs"], ins)) != d["shape"]:
            raise ValueError(f"node {d['name']}: shape {d['shape']} does not follow from its inputs")
        d["param_specs"] = OPS[d["op"]].params(d["attrs"], ins)
    g.graph["input"], g.graph["output"] = plan["input"], plan["output"]
    g.graph["network"] = plan["network"]
    if g.graph["input"] not in g or g.graph["output"] not in g:
        raise ValueError("input or output node missing")
    return g
