"""Layer-local parity of two backends: every layer of the other backend runs on the reference's own
inputs (forward) and the reference's own output gradient (backward), so that each layer is judged
by its kernels alone.

Why not the whole network (`cnnc parity`): there each backend runs on its own activations, and a
ReLU turns an ordinary rounding difference into a discrete one. A pre-activation of 6.1e-6 in
one backend and -1.1e-6 in the other (a 4608-term sum of values up to 8.7, 1e-6 apart: rounding)
passes the gradient in one and blocks it in the other, and every gradient before that layer moves
by a percent. The whole-network floor moves each result by a few of its own ulps, which never
carries a value of 6e-6 across zero, so it cannot stand for this. Here a layer's inputs are the
reference's, its ReLU masks are the reference's, and only its own rounding shows.

A layer that draws random numbers (stochastic depth) draws from the random state the reference's
layer drew from. The floor of a layer is the reference kernel's own distance from itself in float64 on the same
inputs; a layer is over when a result differs by more than `tolerance` and more than
FLOOR_FACTOR times that floor (the same rule as `cnnc parity`, relative to the largest value).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from cnnc.backends.base import Ctx, Kernel, get_backend
from cnnc.runtime.executor import Executor
from cnnc.runtime.model import Model
from cnnc.runtime.parity import FLOOR_FACTOR, rel


def network(path, input_size=None):
    """The graph `cnnc parity` compares: rebuilt at `input_size` (H, W) when given, dropout out."""
    from cnnc.compiler.optimize import remove_dropout
    from cnnc.compiler.pipeline import PassContext, check, run_pipeline
    from cnnc.dsl import load

    g = check(path)
    if input_size is not None:
        program = load(path)
        dims, span = program.input_dims
        program.input_dims = ((dims[0], *input_size), span)
        train, program.train = g.graph.get("train"), None
        g = run_pipeline(program, PassContext())
        g.graph["train"] = train
    return remove_dropout(g, PassContext())


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


def layer_parity(g, other: str, batch: int = 2, seed: int = 0, tolerance: float = 1e-4, reference: str = "numpy",
                 adjust=None, reference_model: Model | None = None):
    """`adjust(model)`, when given, changes the other backend's model after it is built (tests
    give it deliberately different kernels); `reference_model` replaces the reference built from
    `g` (with weights of the caller's choice). Rows per layer: {"layer", "op", "forward", "backward", "floor", "bad"} (backward: the largest
    difference over the input and parameter gradients, None where no gradient reaches the layer)
    and the first layer over (None when all agree)."""
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
        fwd, floor = rel(oth.backend.to_host(y), got["y"]), rel(got["y"], y64)
        bwd = None
        bwd_bad = False
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
        fwd_bad = fwd > max(tolerance, FLOOR_FACTOR * rel(got["y"], y64))
        rows.append({"layer": node.name, "op": node.op, "forward": fwd, "backward": bwd, "floor": floor,
                     "bad": fwd_bad or bwd_bad})
    first_bad = next((r["layer"] for r in rows if r["bad"]), None)
    return rows, first_bad
