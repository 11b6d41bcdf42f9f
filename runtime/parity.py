"""`cnnc parity`: run one network on two backends with the same weights and inputs, layer by layer.

For every layer: the largest relative difference of its output (forward, training mode so that
BatchNorm uses batch statistics; dropout layers are taken out first, since each backend draws its
own random masks), and for every
parameter the relative difference of its gradient. The layer flagged is where to look: the first
with a wrong output, or when every output agrees, the last with a wrong gradient.

Float32 results depend on summation order, and some networks amplify that: BatchNorm over a few
values per channel (ResNet-50's last stage at a small input and batch) turns a last-bit change of
each conv output into gradients tens of percent apart. So the NumPy reference also runs with every
kernel's outputs and gradients moved by one to four float32 ulps at random (what another
summation order does to a long sum), four times, and once in float64; the largest distance from the float32 reference is each
layer's floor. A layer is flagged only when the backends
differ by more than the tolerance and by more than `FLOOR_FACTOR` times its floor: a wrong kernel
lands far above it where the network is well conditioned, reordered sums do not.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cnnc.backends.base import Ctx, Kernel, get_backend
from cnnc.compiler.optimize import remove_dropout
from cnnc.compiler.pipeline import PassContext, check, is_onnx, run_pipeline
from cnnc.dsl import load
from cnnc.dsl.errors import CnncError

from .executor import Executor
from .budget import run_estimate
from .model import Model


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the largest magnitude of `b`; inf where `a` holds a NaN
    or an infinity that `b` does not (an unwritten or overflowed output)."""
    if not a.size:
        return 0.0
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    finite = np.isfinite(b)
    return float(np.abs(a - b)[finite].max(initial=0.0) / max(np.abs(b[finite]).max(initial=0.0), 1e-30))


FLOOR_FACTOR = 10.0
FLOOR_RUNS = 4


FLOOR_ULPS = 4  # a sum of K terms in another order moves by about √K/2 ulps; K is in the hundreds or more


def _ulp_jitter(a, rng):
    """a moved by ±1 … ±FLOOR_ULPS of its own ulps, at random per element."""
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        return a
    steps = rng.integers(1, FLOOR_ULPS + 1, size=a.shape) * np.where(rng.random(a.shape) < 0.5, -1, 1)
    return (a + steps.astype(a.dtype) * np.spacing(a)).astype(a.dtype)


def _jittered(kernel: Kernel, rng) -> Kernel:
    def forward(node, xs, params, ctx):
        y, saved = kernel.forward(node, xs, params, ctx)
        return _ulp_jitter(y, rng), saved

    def backward(node, saved, dy, params, ctx):
        dxs, dps = kernel.backward(node, saved, dy, params, ctx)
        return [_ulp_jitter(d, rng) for d in dxs], {k: _ulp_jitter(v, rng) for k, v in dps.items()}

    return Kernel(forward, backward)


def _with_rounding_noise(model: Model, seed: int) -> Model:
    """The same NumPy model with each kernel's results moved by a few ulps at random."""
    rng = np.random.default_rng(seed)
    model.plan.steps = [replace(s, kernel=_jittered(s.kernel, rng)) for s in model.plan.steps]
    model.executor = Executor(model.plan, model.backend, model.params)
    return model


def _run(ex: Executor, x, seed, to_device=np.asarray, to_host=np.asarray):
    """Training-mode forward with a trace of every layer (host arrays), then backward from a
    fixed random output gradient; the trace and host copies of every parameter gradient."""
    trace: dict = {}
    out = ex.forward(to_device(x), Ctx(training=True, rng=np.random.default_rng(seed)), trace=trace)
    r = np.random.default_rng(seed + 1).normal(size=out.shape).astype(x.dtype)
    return trace, {k: to_host(v) for k, v in ex.backward(to_device(r)).items()}


def _run_model(m: Model, x, seed):
    return _run(m.executor, x, seed, m.backend.to_device, m.backend.to_host)


def _float64_run(g, params: dict, x, seed):
    """The NumPy backend in float64 (its kernels follow their inputs' dtype): the float32
    reference's own distance from it is part of the floor, since two correct float32
    implementations can each be that far from the exact result."""
    numpy = get_backend("numpy")
    ex = Executor(numpy.compile(g), numpy, {k: np.asarray(v, np.float64) for k, v in params.items()})
    return _run(ex, x.astype(np.float64), seed)


def parity(path, backends: tuple[str, str] = ("numpy", "cuda"), batch: int = 2, seed: int = 0,
           input_size: tuple[int, int] | None = None, tolerance: float = 1e-4):
    g = check(path)
    if input_size is not None:  # a smaller image for speed: rebuild with the input resized
        if is_onnx(path):
            raise CnncError(f"--size rebuilds a network from its .cnn source; {path} is an ONNX model",
                            hint=f"write it as .cnn first: `cnnc import {path} -o model.cnn --weights w.npz`")
        program = load(path)
        dims, span = program.input_dims
        program.input_dims = ((dims[0], *input_size), span)
        # the train section's image transforms are checked against the real input size: the resized
        # network keeps the settings already validated for it (its weights' init and seed among them)
        train, program.train = g.graph.get("train"), None
        g = run_pipeline(program, PassContext())
        g.graph["train"] = train
    g = remove_dropout(g, PassContext())
    est = run_estimate(g, f"comparing `{g.graph['network']}` at batch {batch}", batch, training=True)
    outputs = sum(d["bytes"] for _, d in g.nodes(data=True)) * batch // max(g.graph["totals"]["batch"], 1)
    est.parts.append(("layer outputs kept for comparison", (FLOOR_RUNS + 4) * outputs))
    est.check("a smaller --batch or --size")
    ref = Model(g, backends[0], seed)
    other = Model(g, backends[1], seed)
    other.set_params(ref.host_params(), "reference weights")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *ref.input_shape)).astype(np.float32)
    ref_trace, ref_grads = _run_model(ref, x, seed)
    other_trace, other_grads = _run_model(other, x, seed)
    floors = []
    for k in range(FLOOR_RUNS):
        noisy = _with_rounding_noise(Model(g, "numpy", seed), seed + 10 + k)
        noisy.set_params(ref.host_params(), "reference weights")
        floors.append(_run_model(noisy, x, seed))
    floors.append(_float64_run(g, ref.host_params(), x, seed))
    rows = []
    for step in ref.plan.steps:
        name = step.node.name
        fwd = rel(other_trace[name], ref_trace[name])
        fwd_floor = max(rel(t[name], ref_trace[name]) for t, _ in floors)
        qs = [q for q in step.params if q in ref_grads]
        pg = [rel(other_grads[q], ref_grads[q]) for q in qs]
        pg_floor = [max(rel(gr[q], ref_grads[q]) for _, gr in floors) for q in qs]
        fwd_bad = fwd > max(tolerance, FLOOR_FACTOR * fwd_floor)
        grad_bad = any(d > max(tolerance, FLOOR_FACTOR * f) for d, f in zip(pg, pg_floor))
        rows.append({"layer": name, "op": step.node.op, "forward": fwd, "forward_floor": fwd_floor,
                     "grad": max(pg) if pg else None, "grad_floor": max(pg_floor) if pg else None,
                     "forward_bad": fwd_bad, "bad": fwd_bad or grad_bad})
    # An error spreads forward from the first wrong output, and backward from the last wrong
    # gradient: the culprit is the first layer with a wrong output, else the last with a wrong gradient.
    first_bad = next((r["layer"] for r in rows if r["forward_bad"]), None)
    if first_bad is None:
        first_bad = next((r["layer"] for r in reversed(rows) if r["bad"]), None)
    return rows, first_bad


def format_rows(rows, first_bad, backends, tolerance) -> str:
    def num(v):
        return f"{v:.2e}" if v is not None else "-"
    out = [f"{'layer':<40}{'op':<16}{'output':>10}{'(floor)':>10}{'param grad':>12}{'(floor)':>10}", "-" * 98]
    for r in rows:
        mark = "  <-- first over" if r["layer"] == first_bad else ("  over" if r["bad"] else "")
        out.append(f"{r['layer']:<40}{r['op']:<16}{num(r['forward']):>10}{num(r['forward_floor']):>10}"
                   f"{num(r['grad']):>12}{num(r['grad_floor']):>10}{mark}")
    verdict = (f"all {len(rows)} layers agree" if first_bad is None else f"first layer over: {first_bad}")
    out.append(f"\n{backends[1]} against {backends[0]}: {verdict} (relative to the largest value; a layer is over "
               f"when it differs by more than {tolerance:g} and more than {FLOOR_FACTOR:g}× its floor: how far the NumPy "
               f"reference moves when every result moves by a few float32 ulps, or in float64)")
    return "\n".join(out)
