"""The pass pipeline in one straight list, with optimisation levels (TVM's PassContext, small).

Every pass is a named function `fn(g, ctx) -> g`; everything it reads besides the graph comes
from the PassContext, the diagnostics collector (`ctx.diags`) included. One driver, `run`, goes
down the list once: the front end (every level: build_graph → infer_shapes → find_unused →
count → lint_training, source → checked graph and its warnings; the first pass takes the parsed
program) and then the rewrites of compiler/optimize.py, each with the lowest level that runs it
and the modes it is valid for:
passes that would change gradients (BatchNorm folding, dropout removal) run for inference only,
so training plans keep exact gradients. With `ctx.verify` the graph's invariants are checked
after every pass. `check` and `run_pipeline` run the front end, `optimize` the rewrites on a
checked graph with its parameters; all three are `run` with a selection.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx

from cnnc.dsl import ast, load
from cnnc.dsl.errors import CnncError, CnncErrors, Diagnostics, did_you_mean

from . import optimize as opt
from .build import build_graph as _build_graph
from .graph import verify as verify_graph
from .passes import count as _count
from .passes import find_unused as _find_unused
from .passes import infer_shapes as _infer_shapes
from .lint import KNOWN_TRAIN_SIZES
from .lint import lint_training as _lint
from .train_config import TrainConfig, validate_train

BOTH = frozenset({"inference", "training"})
INFERENCE = frozenset({"inference"})


@dataclass
class PassContext:
    """Options the passes read, the diagnostics they report to, and what the driver records."""

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
    diags: Diagnostics = field(default_factory=Diagnostics)  # the front end's errors, raised together
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
    fn: Callable[[Any, PassContext], Any]  # fn(g, ctx) -> g
    level: int  # lowest -O level that runs it
    modes: frozenset[str] = BOTH
    front: bool = False  # part of the front end (source → checked graph), not a rewrite
    # runs on a graph that may still hold errors (statements that failed to build leave gaps), so
    # that independent errors further on are reported too; before any other pass the errors
    # collected so far are raised
    on_errors: bool = False

    def runs(self, ctx: PassContext) -> bool:
        return ctx.opt_level >= self.level and ctx.mode in self.modes and self.name not in ctx.disabled


# ---- the front end's passes ------------------------------------------------------------------

def build_graph(program: ast.Program | nx.MultiDiGraph, ctx: PassContext) -> nx.MultiDiGraph | None:
    """The parsed program → its graph of layers (None when nothing could be built), and the
    validated `train:` section in g.graph["train"]. An imported model (compiler/onnx_import.py)
    arrives built."""
    if isinstance(program, nx.MultiDiGraph):
        return program
    g = _build_graph(program, ctx.diags)
    spans: dict = {}
    train = validate_train(program.train, ctx.diags, program.input_dims, spans)
    if g is not None:
        g.graph["train"] = train
        g.graph["train_spans"] = spans  # where each setting is written, for the training lint
    return g


def infer_shapes(g: nx.MultiDiGraph, ctx: PassContext) -> nx.MultiDiGraph:
    return _infer_shapes(g, ctx.diags)


def find_unused(g: nx.MultiDiGraph, ctx: PassContext) -> nx.MultiDiGraph:
    return _find_unused(g)


def count(g: nx.MultiDiGraph, ctx: PassContext) -> nx.MultiDiGraph:
    return _count(g, ctx.batch)


def lint_training(g: nx.MultiDiGraph, ctx: PassContext) -> nx.MultiDiGraph:
    """The training lint (compiler/lint.py) on the file's train settings (the defaults without a
    `train:` section), as warnings in g.graph["warnings"]. The backend is not known here; the number
    of training images only for the embedded data."""
    config = g.graph.get("train") or TrainConfig()
    g.graph.setdefault("warnings", []).extend(
        _lint(g, config, g.graph.get("train_spans"), train_size=KNOWN_TRAIN_SIZES.get(config.data)))
    return g


PIPELINE = [
    Pass("build_graph", build_graph, 0, front=True, on_errors=True),
    Pass("infer_shapes", infer_shapes, 0, front=True, on_errors=True),
    Pass("find_unused", find_unused, 0, front=True),
    Pass("count", count, 0, front=True),
    Pass("lint_training", lint_training, 0, front=True),
    Pass("eliminate_dead", opt.eliminate_dead, 1),
    Pass("remove_identity", opt.remove_identity, 1),
    Pass("remove_dropout", opt.remove_dropout, 1, INFERENCE),
    Pass("remove_flatten_before_dense", opt.remove_flatten_before_dense, 1),
    Pass("fold_batchnorm", opt.fold_batchnorm, 2, INFERENCE),
    Pass("fuse_gate", opt.fuse_gate, 2),
    Pass("fuse_epilogue", opt.fuse_epilogue, 2),
    Pass("fuse_elementwise", opt.fuse_elementwise, 2),
    Pass("choose_layout", opt.choose_layout, 2),
    Pass("plan_memory", opt.plan_memory, 0),
]
PASS_NAMES = [p.name for p in PIPELINE]


# ---- the driver --------------------------------------------------------------------------------

def run(value, ctx: PassContext, *, front_end: bool = True, rewrites: bool = True,
        params: dict | None = None) -> nx.MultiDiGraph:
    """Run the passes of PIPELINE, in order, that the selection and the context allow.

    `front_end` selects the front-end passes (`value` is then a parsed program), `rewrites` the
    rewrites (without the front end, `value` is a checked graph); of those, a pass runs when
    ctx's level, mode and disabled passes allow it. Errors the front end collects in ctx.diags
    are raised as one CnncErrors before the first pass that needs a clean graph and at the end.
    Before the first rewrite the graph is copied (the caller's stays as it was) and `params`
    (host arrays by qualified name) are copied into g.graph["params"], where passes that change
    weights read and write them. With ctx.verify the graph is verified after every pass (in the
    front end, while no errors are pending); each pass's time goes to ctx.timings and the graph
    after a pass named in ctx.dump_after to ctx.dumps.
    """
    unknown = (ctx.disabled | ctx.dump_after) - set(PASS_NAMES)
    if unknown:
        name = sorted(unknown)[0]
        raise CnncError(f"no pass named `{name}`", hint=did_you_mean(name, PASS_NAMES) or
                        "passes: " + ", ".join(PASS_NAMES))
    started_rewrites = False
    for p in PIPELINE:
        if not (front_end if p.front else rewrites):
            continue
        if not p.front and not started_rewrites:
            ctx.diags.check()
            value = _start_rewrites(value, params)
            started_rewrites = True
        if not p.runs(ctx):
            continue
        if not p.on_errors or value is None:
            ctx.diags.check()
        start = time.perf_counter()
        value = p.fn(value, ctx)
        ctx.timings[p.name] = time.perf_counter() - start
        if ctx.verify and not ctx.diags:
            verify_graph(value)
        if p.name in ctx.dump_after and not ctx.diags:
            ctx.dumps.append((p.name, dump(value)))
    ctx.diags.check()
    return value


def _start_rewrites(g: nx.MultiDiGraph, params: dict | None) -> nx.MultiDiGraph:
    g = g.copy()
    g.graph = dict(g.graph)
    g.graph["params"] = {k: v.copy() for k, v in (params or {}).items()}
    g.graph["report"] = []
    g.graph["nodes_before"] = g.number_of_nodes()
    return g


def run_pipeline(program: ast.Program, ctx: PassContext | None = None) -> nx.MultiDiGraph:
    """The front end: source (or an imported graph) → checked graph. Raises CnncErrors with every independent error."""
    return run(program, ctx or PassContext(), rewrites=False)


def optimize(g: nx.MultiDiGraph, ctx: PassContext, params: dict | None = None) -> nx.MultiDiGraph:
    """Run the rewrites the context's level and mode allow on a checked graph (a copy is made).

    `params` (host arrays by qualified name) are copied into g.graph["params"], where passes that
    change weights read and write them.
    """
    return run(g, ctx, front_end=False, params=params)


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
        shape = "×".join(map(str, d["shape"])) if d.get("shape") else "?"
        src = f"{d['span'].file}:{d['span'].line}" if d.get("span") else "?"
        fused = " [" + " + ".join(op for op, _, _ in d["fused_from"]) + "]" if d.get("fused_from") else ""
        lines.append(f"%{n} {d['name']} = {d['op']}({ins}) {' '.join(shown)} : {shape}{fused}  # {src}".replace(
            "  :", " :"))
    return "\n".join(lines)


def check(path: str | os.PathLike, batch: int = 1, import_roots=(), verify: bool = False) -> nx.MultiDiGraph:
    """Load, build, infer shapes and count one `.cnn` file, or a `.onnx` model (its weights in
    g.graph["weights"]). Raises CnncError / CnncErrors."""
    if batch < 1:
        raise CnncError(f"batch size must be positive, got {batch}")
    if is_onnx(path):
        return check_onnx(path, batch, verify)
    program = load(path, import_roots)
    return run_pipeline(program, PassContext(batch=batch, verify=verify))


def check_onnx(path: str | os.PathLike, batch: int = 1, verify: bool = False, blocks: bool = True) -> nx.MultiDiGraph:
    """A `.onnx` model imported (compiler/onnx_import.py) and checked; with `blocks`, as the `.cnn`
    text the writer (compiler/to_cnn.py) makes of it, so that its repeated structure is block
    instances again (check's table, viz's clusters). The weights, in g.graph["weights"], follow
    their layers' names. Should the written text not check (a bug), the flat graph is kept, with
    a warning."""
    from .onnx_import import load_onnx
    g = run_pipeline(load_onnx(path), PassContext(batch=batch, verify=verify))
    if not blocks:
        return g
    from cnnc.dsl.errors import CnncWarning
    from cnnc.dsl.loader import load_text

    from .to_cnn import write
    written = write(g)
    try:
        again = run_pipeline(load_text(written.text, f"{path} as .cnn"), PassContext(batch=batch, verify=verify))
    except (CnncError, CnncErrors) as err:
        first = err.errors[0] if isinstance(err, CnncErrors) else err
        g.graph["warnings"].append(CnncWarning(f"{path}: its repeated structure is not recovered ({first.message}); "
                                               "its layers are shown one by one"))
        return g
    again.graph["weights"] = {written.param_names[k]: v for k, v in g.graph["weights"].items()}
    again.graph["onnx"] = g.graph["onnx"]
    return again


def is_onnx(path: str | os.PathLike) -> bool:
    """A path the ONNX front end reads rather than the .cnn parser."""
    return str(path).lower().endswith(".onnx")


__all__ = ["PIPELINE", "PASS_NAMES", "Pass", "PassContext", "check", "dump", "optimize", "run", "run_pipeline",
           "CnncErrors"]
