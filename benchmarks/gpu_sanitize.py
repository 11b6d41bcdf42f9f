"""Launch every CUDA convolution kernel configuration once on small problems: the program that
compute-sanitizer wraps (memcheck, racecheck, initcheck), and a run-to-run determinism check.

Each case is one conv node (a problem of `PROBLEMS`) with one tile configuration for all three
passes (forward, data gradient, weight gradient; split-K 1 and 3 for the weight gradient), a
tensor-core configuration of each precision (conv.MMA_CONFIGS: tf32, bf16, fp16, all three
passes on the tensor cores), a Winograd forward (conv.WINO_CONFIGS, 3x3 stride 1), or a depthwise node (its direct kernels, no configuration). A case
runs forward and backward through `conv.kernels_in(precision)`, exactly as a network does (bias
gradient, weight transpose, split reduction included), and its results are compared with the
NumPy backend in float64 on the operands rounded to the case's precision. With
`--repeat N` every case runs N times and each output must be bitwise equal to the first: the
kernels sum in a fixed order and use no atomics, so any difference is a race or a read of
memory nobody wrote.

    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --problems vgg19 --repeat 20   # the vgg19 stage-4 layer
    python benchmarks/gpu_sanitize.py --list                           # the cases; no GPU needed
    python benchmarks/gpu_sanitize.py --build-only                     # compile them first (nvcc, cached)

Outputs are allocated without CuPy's memory pool (`--pool` keeps it), so that initcheck sees
each output as fresh, unwritten memory; `device.POISON` stays off for the same reason (NaN
fills would count as writes). Exit status: 0 all cases right, 1 a wrong or non-deterministic
result, 2 no GPU.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from dataclasses import dataclass, replace

import numpy as np

TOL = 1e-5  # relative error norm against the float64 NumPy reference (tests/backends/test_cuda_conv.py)
SPLITS = (1, 3)  # weight-gradient split-K counts: the direct store, and partials plus conv_reduce.cu


@dataclass(frozen=True)
class Problem:
    """A conv node to build: op, attributes, input shape (C, H, W) and batch."""

    name: str
    op: str
    kw: dict
    shape: tuple[int, int, int]
    batch: int
    tiled: bool = True  # False: depthwise, no tile configuration


# `small`: every code path of the templates on shapes that keep racecheck within seconds;
# `vgg19`: the layer of VGG-19's stage 4 at the parity size (64x64 input): C = K = 512, 8x8, batch 2
PROBLEMS = {
    "small": [
        Problem("vgg-stage4-geometry", "conv", dict(filters=64, kernel=3, pad=1), (64, 8, 8), 2),
        Problem("gather-k33-tails", "conv", dict(filters=33, kernel=3, pad=1), (5, 7, 7), 3),
        Problem("pointwise-float4", "conv", dict(filters=20, kernel=1), (12, 4, 4), 2),
        Problem("fused-s2-tanh-res", "fused_conv", dict(filters=24, kernel=3, stride=2, pad=1, round="floor",
                                                         activation="tanh", residual=True), (8, 8, 8), 2),
        Problem("fused-gelu-save-pre", "fused_conv", dict(filters=8, kernel=3, pad=1, activation="gelu"),
                (6, 6, 6), 2),
        Problem("depthwise-s2", "conv", dict(filters=8, kernel=3, groups=8, pad=1, stride=2), (8, 7, 7), 2,
                tiled=False),
    ],
    "vgg19": [
        Problem("vgg19-stage4", "conv", dict(filters=512, kernel=3, pad=1), (512, 8, 8), 2),
    ],
}


@dataclass(frozen=True)
class Case:
    problem: Problem
    config: object  # a conv.Config for every pass (weight-gradient splits set), or None (depthwise)

    @property
    def id(self) -> str:
        return f"{self.problem.name} {self.config!r}" if self.config is not None else self.problem.name


def make_node(problem: Problem):
    """The problem as the compiler builds it (shape rule, resolved pads)."""
    from cnnc.backends.base import NodeInfo
    from cnnc.compiler.ops import OPS, resolve_pads

    kw, shape = problem.kw, tuple(problem.shape)
    base = {k: v for k, v in kw.items() if k not in ("activation", "act_args", "residual")}
    out = tuple(OPS["conv"].shape(OPS["conv"].attrs(**base), [shape]))
    attrs = OPS[problem.op].attrs(**kw)
    ins = (shape,) + ((out,) if kw.get("residual") else ())
    eff = tuple((attrs.kernel[i] - 1) * attrs.dilation[i] + 1 for i in (0, 1))
    pads = resolve_pads(attrs.pad, shape[1], shape[2], eff, attrs.stride)
    return NodeInfo(1, problem.name, problem.op, attrs, ins, out, pads)


def cases(which: str = "small") -> list[Case]:
    """Every configuration of conv.CONFIGS with every split count per tiled problem, every
    tensor-core configuration of every precision where the reference's rounding of dy and the
    kernels' of dz agree (no activation, relu), and the Winograd forward's configurations on 3x3
    stride-1 problems; one case per depthwise problem."""
    from cnnc.backends.cuda import conv

    out = []
    for problem in PROBLEMS[which]:
        if not problem.tiled:
            out.append(Case(problem, None))
            continue
        for cfg in conv.CONFIGS:
            for splits in SPLITS:
                out.append(Case(problem, replace(cfg, splits=splits)))
        if problem.kw.get("activation", "none") in ("none", "relu"):  # where rounding dy and dz agree
            out += [Case(problem, cfg) for configs in conv.MMA_CONFIGS.values() for cfg in configs]
        if conv.Problem.from_node(make_node(problem)).winograd:  # the Winograd forward's four kernels
            out += [Case(problem, cfg) for cfg in conv.WINO_CONFIGS]
    return out


def case_specs(case: Case) -> list:
    """The kernel specs a case launches (what `conv.specs` lists for its node and configuration)."""
    from cnnc.backends.cuda import conv
    precision = case.config.precision if case.config is not None else "fp32"
    return conv.specs(make_node(case.problem), True, config=case.config, precision=precision)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_case(case: Case, to_dev, to_host, repeat: int = 1) -> dict:
    """Forward and backward of the case `repeat` times on whatever `device` is; returns
    {"errors": relative error per output against NumPy float64, "unstable": outputs that
    changed between repeats}."""
    from cnnc.backends.base import Ctx
    from cnnc.backends.cuda import conv
    from cnnc.backends.numpy import NumpyBackend
    from cnnc.backends.numpy.precision import round_to
    from cnnc.compiler.ops import OPS

    node = make_node(case.problem)
    batch = case.problem.batch
    rng = np.random.default_rng(zlib.crc32(case.problem.name.encode()))
    params = {s.name: rng.normal(0, 0.5, s.shape) for s in OPS[node.op].params(node.attrs, list(node.in_shapes[:1]))}
    xs = [rng.normal(0, 1, (batch, *s)) for s in node.in_shapes]
    dy = rng.normal(0, 1, (batch, *node.out_shape))
    d_params = {k: to_dev(v.astype(np.float32)) for k, v in params.items()}
    d_xs = [to_dev(v.astype(np.float32)) for v in xs]
    d_dy = to_dev(dy.astype(np.float32))
    precision = case.config.precision if case.config is not None else "fp32"
    kernel = conv.kernels_in(precision)[node.op]
    first, unstable = None, set()
    for _ in range(repeat):
        y, saved = kernel.forward(node, d_xs, d_params, Ctx(training=True), config=case.config)
        dxs, dparams = kernel.backward(node, saved, d_dy, d_params, Ctx(training=True), config=case.config)
        got = {"y": to_host(y), **{f"dx{i}": to_host(d) for i, d in enumerate(dxs)},
               **{"d" + k: to_host(v) for k, v in dparams.items()}}
        if first is None:
            first = got
        else:
            unstable |= {k for k in got if not np.array_equal(got[k].view(np.uint32), first[k].view(np.uint32))}
    # the reference computes on the operands the tensor cores see (x, the weight and dy rounded)
    ref = NumpyBackend().kernel(node.op)
    rounded = lambda a: round_to(a.astype(np.float32), precision).astype(np.float64)  # noqa: E731
    r_params = {k: rounded(v) if k == "weight" else v for k, v in params.items()}
    y_ref, s_ref = ref.forward(node, [rounded(xs[0]), *xs[1:]], r_params, Ctx(training=True))
    dxs_ref, dp_ref = ref.backward(node, s_ref, rounded(dy), r_params, Ctx(training=True))
    want = {"y": y_ref, **{f"dx{i}": d for i, d in enumerate(dxs_ref)}, **{"d" + k: v for k, v in dp_ref.items()}}
    return {"errors": {k: rel(first[k], want[k]) for k in want}, "unstable": sorted(unstable)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", choices=sorted(PROBLEMS), default="small",
                    help="small: every code path on small shapes (default); vgg19: VGG-19's stage-4 layer")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; outputs must be bitwise equal")
    ap.add_argument("--only", help="run the cases whose id contains this text")
    ap.add_argument("--pool", action="store_true", help="keep CuPy's memory pool (initcheck then misses reuse)")
    ap.add_argument("--list", action="store_true", help="print the cases and the kernels they launch; no GPU")
    ap.add_argument("--build-only", action="store_true",
                    help="compile the cases' kernels with nvcc into the disk cache and stop (no launches)")
    args = ap.parse_args(argv)

    todo = [c for c in cases(args.problems) if not args.only or args.only in c.id]
    if args.list:
        templates = sorted({s.template for c in todo for s in case_specs(c)})
        for c in todo:
            print(c.id)
        print(f"{len(todo)} cases, kernels: {', '.join(templates)}")
        return 0

    from cnnc.backends.cuda import device, tuner
    if not device.gpu_available():
        print("gpu_sanitize: needs an NVIDIA GPU with CuPy (pip install 'cnnc[cuda]')", file=sys.stderr)
        return 2
    cp = device.cupy()
    if not args.pool:
        cp.cuda.set_allocator(None)  # every array its own cudaMalloc: initcheck sees unwritten outputs
    tuner.MODE = "off"  # the configurations are the cases'
    device.POISON = False
    device.prebuild([s for c in todo for s in case_specs(c)])
    if args.build_only:
        print(f"compiled the kernels of {len(todo)} cases")
        return 0
    bad = 0
    for c in todo:
        r = run_case(c, cp.asarray, cp.asnumpy, args.repeat)
        wrong = {k: v for k, v in r["errors"].items() if not v <= TOL}
        ok = not wrong and not r["unstable"]
        bad += not ok
        errs = " ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        print(f"{'ok   ' if ok else 'WRONG'} {c.id}: {errs}"
              + (f"; changed between repeats: {', '.join(r['unstable'])}" if r["unstable"] else ""), flush=True)
    print(f"{len(todo) - bad} of {len(todo)} cases right" + (f", {args.repeat} runs each bitwise equal"
                                                            if args.repeat > 1 else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
