"""The pass pipeline in one straight list, with optimisation levels (TVM's PassContext, small).

Front end (every level): build_graph → infer_shapes → find_unused → count. Then the rewrites
of compiler/optimize.py, each with the lowest level that runs it and the modes it is valid
for: passes that would change gradients (BatchNorm folding, dropout removal) run for
inference only, so training plans keep exact gradients. `check` runs the front end;
`optimize` runs the rest on a checked graph with its parameters.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx

from cnnc.dsl import ast, load
from cnnc.dsl.errors import CnncError, CnncErrors, Diagnostics

from . import optimize as opt
from .build import build_graph
from .graph import verify as verify_graph
from .passes import count, find_unused, infer_shapes
from .train_config import validate_train

BOTH = frozenset({"inference", "training"})
INFERENCE = frozenset({"inference"})


@dataclass
class PassContext:
    """Options the passes read."""

    batch: int = 1
    verify: bool = False
    opt_level: int = 2
    mode: str = "inference"  # or "training"
    disabled: frozenset[str] = frozenset()
    dump_after: frozenset[str] = frozenset()
    backend_name: str = "numpy"
    fused_ops: frozenset[str] = frozenset()
    # the backend's capability query (Backend.fusion_refusal): None, or why a fusion is refused
    fusion_check: Callable[[str, tuple[str, ...]], str | None] | None = None
    layouts: dict[str, str] = field(default_factory=dict)  # op → preferred layout of its input
    timings: dict[str, float] = field(default_factory=dict)
    dumps: list[tuple[str, str]] = field(default_factory=list)

    def fusion_refusal(self, target: str, ops: tuple[str, ...]) -> str | None:
        """Why `target` fused from `ops` is refused, or None: the backend's answer when it gave one."""
        if self.fusion_check is not None:
            return self.fusion_check(target, ops)
        if target not in self.fused_ops:
            return f"backend `{self.backend_name}` has no {target} kernel"
        return None


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable
    level: int  # lowest -O level that runs it
    modes: frozenset[str] = BOTH
    front: bool = False  # part of the front end: runs on a graph that may still hold errors

    def runs(self, ctx: PassContext) -> bool:
        return ctx.opt_level >= self.level and ctx.mode in self.modes and self.name not in ctx.disabled


def _stage_build(program: ast.Program, ctx: PassContext, diags: Diagnostics) -> nx.MultiDiGraph:
    g = build_graph(program, diags)
    train = validate_train(program.train, diags)
    if g is not None:
        g.graph["train"] = train
    return g


PIPELINE = [
    Pass("build_graph", _stage_build, 0, front=True),
    Pass("infer_shapes", lambda g, ctx, diags: infer_shapes(g, diags), 0, front=True),
    Pass("find_unused", lambda g, ctx, diags: find_unused(g), 0, front=True),
    Pass("count", lambda g, ctx, diags: count(g, ctx.batch), 0, front=True),
    Pass("eliminate_dead", opt.eliminate_dead, 1),
    Pass("remove_identity", opt.remove_identity, 1),
    Pass("remove_dropout", opt.remove_dropout, 1, INFERENCE),
    Pass("remove_flatten_before_dense", opt.remove_flatten_before_dense, 1),
    Pass("fold_batchnorm", opt.fold_batchnorm, 2, INFERENCE),
    Pass("fuse_epilogue", opt.fuse_epilogue, 2),
    Pass("fuse_elementwise", opt.fuse_elementwise, 2),
    Pass("choose_layout", opt.choose_layout, 2),
    Pass("plan_memory", opt.plan_memory, 0),
]
PASS_NAMES = [p.name for p in PIPELINE]


def run_pipeline(program: ast.Program, ctx: PassContext | None = None) -> nx.MultiDiGraph:
    """The front end: source → checked graph. Raises CnncErrors with every independent error."""
    ctx = ctx or PassContext()
    diags = Diagnostics()
    value = program
    for p in PIPELINE:
        if not p.front:
            continue
        # shape inference also runs over a graph with gaps left by statements that failed to
        # build, so that shape errors elsewhere in the file are reported too
        if p.name in ("find_unused", "count") or value is None:
            diags.check()
        start = time.perf_counter()
        value = p.fn(value, ctx, diags)
        ctx.timings[p.name] = time.perf_counter() - start
        if ctx.verify and not diags:
            verify_graph(value)
    diags.check()
    return value


def optimize(g: nx.MultiDiGraph, ctx: PassContext, params: dict | None = None) -> nx.MultiDiGraph:
    """Run the rewrites the context's level and mode allow on a checked graph (a copy is made).

    `params` (host arrays by qualified name) are copied into g.graph["params"], where passes that
    change weights read and write them.
    """
    unknown = (ctx.disabled | ctx.dump_after) - set(PASS_NAMES)
    if unknown:
        from cnnc.dsl.errors import did_you_mean
        name = sorted(unknown)[0]
        raise CnncError(f"no pass named `{name}`", hint=did_you_mean(name, PASS_NAMES) or
                        "passes: " + ", ".join(PASS_NAMES))
    g = g.copy()
    g.graph = dict(g.graph)
    g.graph["params"] = {k: v.copy() for k, v in (params or {}).items()}
    g.graph["report"] = []
    g.graph["nodes_before"] = g.number_of_nodes()
    for p in PIPELINE:
        if p.front or not p.runs(ctx):
            continue
        start = time.perf_counter()
        g = p.fn(g, ctx)
        ctx.timings[p.name] = time.perf_counter() - start
        if ctx.verify:
            verify_graph(g)
        if p.name in ctx.dump_after:
            ctx.dumps.append((p.name, dump(g)))
    return g


def dump(g: nx.MultiDiGraph) -> str:
    """One line per node: id, name, op(inputs), attributes that differ from defaults, shape, source line."""
    from .graph import inputs_of
    from .ops import OPS

    lines = []
    for n in sorted(g.nodes):
        d = g.nodes[n]
        a = d["attrs"]
        defaults = OPS[d["op"]].attrs.model_fields
        shown = []
        for k, v in a.model_dump().items():
            info = defaults.get(k)
            if k == "name" or (info is not None and not info.is_required() and info.default == v):
                continue
            if isinstance(v, tuple) and all(isinstance(x, int) for x in v):
                v = "x".join(map(str, v))
            shown.append(f"{k}={v}")
        ins = ", ".join(f"%{u}" for u in inputs_of(g, n))
        shape = "×".join(map(str, d["shape"]))
        src = f"{d['span'].file}:{d['span'].line}" if d.get("span") else "?"
        fused = " [" + " + ".join(op for op, _, _ in d["fused_from"]) + "]" if d.get("fused_from") else ""
        lines.append(f"%{n} {d['name']} = {d['op']}({ins}) {' '.join(shown)} : {shape}{fused}  # {src}".replace(
            "  :", " :"))
    return "\n".join(lines)


def check(path: str | os.PathLike, batch: int = 1, import_roots=(), verify: bool = False) -> nx.MultiDiGraph:
    """Load, build, infer shapes and count one `.cnn` file. Raises CnncError / CnncErrors."""
    if batch < 1:
        raise CnncError(f"batch size must be positive, got {batch}")
    program = load(path, import_roots)
    return run_pipeline(program, PassContext(batch=batch, verify=verify))


__all__ = ["PIPELINE", "PASS_NAMES", "Pass", "PassContext", "check", "dump", "optimize", "run_pipeline",
           "CnncErrors"]
