"""The front-end pipeline in one straight list: build graph → infer shapes → count.

`check` loads a file, runs the passes, and raises `CnncErrors` holding every independent
error found. With `verify=True` the graph invariant check runs after every pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import networkx as nx

from cnnc.dsl import ast, load
from cnnc.dsl.errors import CnncError, CnncErrors, Diagnostics

from .build import build_graph
from .graph import verify as verify_graph
from .passes import count, find_unused, infer_shapes
from .train_config import validate_train


@dataclass
class PassContext:
    """Options the passes read (TVM's PassContext, small)."""

    batch: int = 1
    verify: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _stage_build(program: ast.Program, ctx: PassContext, diags: Diagnostics) -> nx.MultiDiGraph:
    g = build_graph(program, diags)
    train = validate_train(program.train, diags)
    if g is not None:
        g.graph["train"] = train
    return g


# (name, function, needs_sound_graph). Shape inference also runs over a graph with gaps left by
# statements that failed to build, so that shape errors elsewhere in the file are reported too.
PIPELINE = [
    ("build_graph", _stage_build, False),
    ("infer_shapes", lambda g, ctx, diags: infer_shapes(g, diags), False),
    ("find_unused", lambda g, ctx, diags: find_unused(g), True),
    ("count", lambda g, ctx, diags: count(g, ctx.batch), True),
]


def run_pipeline(program: ast.Program, ctx: PassContext | None = None) -> nx.MultiDiGraph:
    ctx = ctx or PassContext()
    diags = Diagnostics()
    value = program
    for name, fn, needs_sound_graph in PIPELINE:
        if needs_sound_graph or value is None:
            diags.check()
        start = time.perf_counter()
        value = fn(value, ctx, diags)
        ctx.timings[name] = time.perf_counter() - start
        if ctx.verify and not diags:
            verify_graph(value)
    diags.check()
    return value


def check(path: str | os.PathLike, batch: int = 1, import_roots=(), verify: bool = False) -> nx.MultiDiGraph:
    """Load, build, infer shapes and count one `.cnn` file. Raises CnncError / CnncErrors."""
    if batch < 1:
        raise CnncError(f"batch size must be positive, got {batch}")
    program = load(path, import_roots)
    return run_pipeline(program, PassContext(batch=batch, verify=verify))


__all__ = ["PIPELINE", "PassContext", "check", "run_pipeline", "CnncErrors"]
