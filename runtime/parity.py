"""`cnnc parity`: run one network on two backends with the same weights and inputs, layer by layer.

For every layer: the largest relative difference of its output (forward, training mode so that
BatchNorm uses batch statistics and both backends see the same dropout-free path), and for every
parameter the relative difference of its gradient. The layer flagged is where to look: the first
with a wrong output, or when every output agrees, the last with a wrong gradient.
"""

from __future__ import annotations

import numpy as np

from cnnc.backends.base import Ctx
from cnnc.compiler.pipeline import check

from .model import Model


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.size else 0.0


def parity(path, backends: tuple[str, str] = ("numpy", "cuda"), batch: int = 2, seed: int = 0,
           input_size: tuple[int, int] | None = None, tolerance: float = 1e-4):
    g = check(path)
    if input_size is not None:  # a smaller image for speed: rebuild with the input resized
        from cnnc.compiler.pipeline import PassContext, run_pipeline
        from cnnc.dsl import load
        program = load(path)
        dims, span = program.input_dims
        program.input_dims = ((dims[0], *input_size), span)
        g = run_pipeline(program, PassContext())
    ref = Model(g, backends[0], seed)
    other = Model(g, backends[1], seed)
    other.set_params(ref.host_params(), "reference weights")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *ref.input_shape)).astype(np.float32)
    rows = []
    traces = []
    grads = []
    for m in (ref, other):
        trace: dict = {}
        out = m.executor.forward(m.backend.to_device(x), Ctx(training=True, rng=np.random.default_rng(seed)),
                                 trace=trace)
        r = np.random.default_rng(seed + 1).normal(size=m.backend.to_host(out).shape).astype(np.float32)
        grads.append({k: m.backend.to_host(v) for k, v in m.executor.backward(m.backend.to_device(r)).items()})
        traces.append(trace)
    for step in ref.plan.steps:
        name = step.node.name
        fwd = rel(traces[1][name], traces[0][name])
        pg = [rel(grads[1][q], grads[0][q]) for q in step.params if q in grads[0]]
        bad = max([fwd, *pg]) > tolerance
        rows.append({"layer": name, "op": step.node.op, "forward": fwd, "grad": max(pg) if pg else None, "bad": bad})
    # An error spreads forward from the first wrong output, and backward from the last wrong
    # gradient: the culprit is the first layer with a wrong output, else the last with a wrong gradient.
    first_bad = next((r["layer"] for r in rows if r["forward"] > tolerance), None)
    if first_bad is None:
        first_bad = next((r["layer"] for r in reversed(rows) if r["bad"]), None)
    return rows, first_bad


def format_rows(rows, first_bad, backends, tolerance) -> str:
    out = [f"{'layer':<40}{'op':<16}{'output':>12}{'param grad':>12}", "-" * 80]
    for r in rows:
        grad = f"{r['grad']:.2e}" if r["grad"] is not None else "-"
        mark = "  <-- first over tolerance" if r["layer"] == first_bad else ("  over" if r["bad"] else "")
        out.append(f"{r['layer']:<40}{r['op']:<16}{r['forward']:>12.2e}{grad:>12}{mark}")
    verdict = (f"all {len(rows)} layers within {tolerance:g}" if first_bad is None else
               f"first layer over {tolerance:g}: {first_bad}")
    out.append(f"\n{backends[1]} against {backends[0]}: {verdict} (relative to the largest value)")
    return "\n".join(out)
