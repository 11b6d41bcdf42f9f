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

`--local` (`local_parity`) judges each layer by its own kernels: every layer of the other backend runs
on the reference's own inputs (forward) and output gradient (backward). Whole-network parity lets each
backend run on its own activations, and a ReLU turns an ordinary rounding difference into a discrete
one: VGG-19's stage4.conv3 pre-activation at one position is 6.1e-6 in NumPy and -1.1e-6 on the GPU (a
4608-term sum of values up to 8.7: rounding), so one backend passes that gradient and the other blocks
it, and every gradient before it moves by a percent. No ulp-sized floor carries 6e-6 across zero; the
local comparison gives each layer the reference's ReLU masks, so only its own rounding shows. A local
layer's floor is the reference kernel's distance from itself in float64 on the same inputs.
"""

from __future__ import annotations

import copy
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


def network(path, input_size: tuple[int, int] | None = None):
    """The graph both modes compare: rebuilt at `input_size` (H, W) when given, dropout taken out."""
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
    return remove_dropout(g, PassContext())


def parity(path, backends: tuple[str, str] = ("numpy", "cuda"), batch: int = 2, seed: int = 0,
           input_size: tuple[int, int] | None = None, tolerance: float = 1e-4):
    g = network(path, input_size)
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


def _recording(model: Model, log: dict) -> None:
    """Wrap the model's kernels so that each step's host inputs, output gradient and results are
    kept in `log[name]`."""
    to_host = model.backend.to_host

    def wrap(step):
        k = step.kernel

        def forward(node, xs, params, ctx):
            rng = copy.deepcopy(ctx.rng)  # the random state this layer drew from (stochastic depth)
            y, saved = k.forward(node, xs, params, ctx)
            log[node.name] = {"xs": [np.array(to_host(x)) for x in xs], "y": np.array(to_host(y)), "rng": rng}
            return y, saved

        def backward(node, saved, dy, params, ctx):
            dxs, dps = k.backward(node, saved, dy, params, ctx)
            log[node.name].update(dy=np.array(to_host(dy)),
                                  dxs=[None if d is None else np.array(to_host(d)) for d in dxs],
                                  dps={q: np.array(to_host(v)) for q, v in dps.items()})
            return dxs, dps

        return replace(step, kernel=Kernel(forward, backward))

    model.plan.steps = [wrap(s) for s in model.plan.steps]
    model.executor = Executor(model.plan, model.backend, model.params)


def local_parity(g, other: str, batch: int = 2, seed: int = 0, tolerance: float = 1e-4, reference: str = "numpy",
                 adjust=None, reference_model: Model | None = None):
    """Each layer of backend `other` on the reference's own inputs and output gradient (see the module
    docstring). `adjust(model)`, when given, changes the other backend's model after it is built (a test
    gives it deliberately different kernels); `reference_model` replaces the reference built from `g`.
    Rows per layer: {"layer", "op", "forward", "backward", "floor", "bad"} (backward: the largest difference
    over the input and parameter gradients, None where no gradient reaches the layer), and the first layer
    over (None when all agree)."""
    est = run_estimate(g, f"comparing `{g.graph['network']}` layer by layer at batch {batch}", batch, training=True)
    outputs = sum(d["bytes"] for _, d in g.nodes(data=True)) * batch // max(g.graph["totals"]["batch"], 1)
    # the log keeps each layer's inputs, output, gradients; the float64 floor doubles one layer's share
    est.parts.append(("layer inputs, outputs and gradients kept for comparison", 6 * outputs))
    est.check("a smaller --batch or --size")
    ref = reference_model or Model(g, reference, seed)
    oth = Model(g, other, seed)
    oth.set_params(ref.host_params(), "reference weights")
    if adjust is not None:
        adjust(oth)
    log: dict = {}
    _recording(ref, log)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *ref.input_shape)).astype(np.float32)
    ctx = Ctx(training=True, rng=np.random.default_rng(seed))
    out = ref.executor.forward(x, ctx)
    ref.executor.backward(np.random.default_rng(seed + 1).normal(size=out.shape).astype(np.float32))

    numpy = get_backend("numpy")
    rows = []
    for i, step in enumerate(oth.plan.steps):
        node, got = step.node, log[step.node.name]
        params = {local: oth.params[q] for local, q in oth.executor._local[i].items()}
        step_ctx = Ctx(training=True, rng=copy.deepcopy(got["rng"]))
        y, saved = step.kernel.forward(node, [oth.backend.to_device(v) for v in got["xs"]], params, step_ctx)
        # the floor: the reference kernel in float64 on the same inputs
        ref_kernel = numpy.kernel(node.op)
        p64 = {local: np.asarray(ref.params[q], np.float64) for local, q in ref.executor._local[i].items()}
        y64, saved64 = ref_kernel.forward(node, [v.astype(np.float64) for v in got["xs"]], p64,
                                          Ctx(training=True, rng=copy.deepcopy(got["rng"])))
        fwd, fwd_floor = rel(oth.backend.to_host(y), got["y"]), rel(got["y"], y64)
        floor, bwd, bwd_bad = fwd_floor, None, False
        if "dy" in got:
            bctx = oth.executor.backward_ctx(i, step_ctx)
            dxs, dps = step.kernel.backward(node, saved, oth.backend.to_device(got["dy"]), params, bctx)
            dxs64, dps64 = ref_kernel.backward(node, saved64, got["dy"].astype(np.float64), p64,
                                               ref.executor.backward_ctx(i, step_ctx))
            pairs = [(a, b, c) for a, b, c in zip(dxs, got["dxs"], dxs64) if a is not None and b is not None]
            pairs += [(dps[k], got["dps"][k], dps64[k]) for k in got["dps"]]
            diffs = [(rel(oth.backend.to_host(a), b), rel(b, c)) for a, b, c in pairs]
            if diffs:
                bwd = max(d for d, _ in diffs)
                floor = max([floor] + [f for _, f in diffs])
                bwd_bad = any(d > max(tolerance, FLOOR_FACTOR * f) for d, f in diffs)
        fwd_bad = fwd > max(tolerance, FLOOR_FACTOR * fwd_floor)
        rows.append({"layer": node.name, "op": node.op, "forward": fwd, "backward": bwd, "floor": floor,
                     "bad": fwd_bad or bwd_bad})
    first_bad = next((r["layer"] for r in rows if r["bad"]), None)
    return rows, first_bad


def _layer_table(rows, first_bad, columns) -> tuple[list[str], str]:
    """The lines of a per-layer table (layer, op, then `columns`: (header, row key, width)) and
    its verdict."""
    def num(v):
        return f"{v:.2e}" if v is not None else "-"
    head = f"{'layer':<40}{'op':<16}" + "".join(f"{h:>{w}}" for h, _, w in columns)
    out = [head, "-" * len(head)]
    for r in rows:
        mark = "  <-- first over" if r["layer"] == first_bad else ("  over" if r["bad"] else "")
        out.append(f"{r['layer']:<40}{r['op']:<16}" + "".join(f"{num(r[k]):>{w}}" for _, k, w in columns) + mark)
    return out, (f"all {len(rows)} layers agree" if first_bad is None else f"first layer over: {first_bad}")


def format_local_rows(rows, first_bad, backends, tolerance) -> str:
    out, verdict = _layer_table(rows, first_bad, [("output", "forward", 10), ("gradients", "backward", 11),
                                                  ("(floor)", "floor", 10)])
    out.append(f"\n{backends[1]} against {backends[0]}, each layer on {backends[0]}'s inputs and output gradient: "
               f"{verdict} (relative to the largest value; a layer is over when a result differs by more than "
               f"{tolerance:g} and more than {FLOOR_FACTOR:g}× its floor: the {backends[0]} kernel's distance from "
               f"itself in float64)")
    return "\n".join(out)


def format_rows(rows, first_bad, backends, tolerance) -> str:
    out, verdict = _layer_table(rows, first_bad, [("output", "forward", 10), ("(floor)", "forward_floor", 10),
                                                  ("param grad", "grad", 12), ("(floor)", "grad_floor", 10)])
    if first_bad is not None:
        verdict += (" (after a ReLU a rounding difference can flip a value's sign and turn into a discrete one; "
                    "--local judges each layer on the reference's own inputs)")
    out.append(f"\n{backends[1]} against {backends[0]}: {verdict} (relative to the largest value; a layer is over "
               f"when it differs by more than {tolerance:g} and more than {FLOOR_FACTOR:g}× its floor: how far the NumPy "
               f"reference moves when every result moves by a few float32 ulps, or in float64)")
    return "\n".join(out)
