"""The NumPy backend against PyTorch and onnxruntime on this CPU, all run in this process, same threads.

Rows (goals as ratios to the peer measured in the same run; issue 20's goals where it sets one):
  LeNet-5 training step, batch 64              our time / torch's time   goal ≤ 0.5
  ResNet-20 (CIFAR) training step, batch 128   our time / torch's time   goal ≤ 1.0
  conv 256→256 3×3, 56×56, batch 8, forward    our GFLOP/s / torch's     goal ≥ 0.8
  ResNet-50 inference (-O2), batch 1 and 16    our time / torch's time   reported
  MobileNetV2, EfficientNet-B0 (224×224):      our time / torch's time
    inference (-O2) batch 1 (goal ≤ 1.5), training step batch 32 (MobileNetV2 ≤ 1.0, EfficientNet-B0 ≤ 1.5)
  ResNet-50 inference vs onnxruntime, batch 1 and 16             our time / onnxruntime's   goal ≤ 1.0
  MobileNetV2, EfficientNet-B0 inference vs onnxruntime, batch 1   our time / onnxruntime's   goal ≤ 1.0
  `cnnc train` LeNet-5, 15 epochs of MNIST-5k  our time / the plain path's   goal ≤ 0.5
A training step is forward, cross-entropy, backward and an SGD-momentum update, on the training
plan `cnnc train` runs. This machine's load changes from second to second, so the two sides
alternate: each round times ours, then the peer's, a few repeats each (median), each side after a
pause that lets the other's spinning threads go quiet (SETTLE_S); the row's figure
is the median over rounds of the per-round ratio. The onnxruntime rows time our ONNX export
(`cnnc export`, -O0) in an onnxruntime CPU session with as many intra-op threads as cnnc has;
their peer column is onnxruntime. The `cnnc train` row runs whole trainings (one a round each
side); its peer is the same training on the plain path: the plain training plan, CNNC_JIT=0.

    python benchmarks/cpu.py                 # all rows, about 20 minutes on 2 cores
    python benchmarks/cpu.py --rounds 3 --only lenet5,conv256
    python benchmarks/cpu.py --json results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def network_inputs(name: str, batch: int):
    """A zoo network, a batch of inputs and labels, and the training settings every peer uses."""
    from cnnc.compiler.train_config import TrainConfig
    from cnnc.runtime.model import Model

    model = Model.load(EXAMPLES / f"{name}.cnn")
    rng = np.random.default_rng(0)
    xh = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
    yh = rng.integers(0, int(model.classes), batch)
    return model, xh, yh, TrainConfig(optimizer="momentum", momentum=0.9, lr=0.001, batch=batch)


def our_step(model, xh, yh, train: bool, config):
    """Our training step (the plan `cnnc train` runs) or -O2 inference, as a callable."""
    from cnnc.backends.base import Ctx
    from cnnc.runtime.artifact import compile_model
    from cnnc.runtime.bench import _train_step

    if train:
        return _train_step(model, xh, yh, config)
    compiled = compile_model(model, 2)
    return lambda: compiled.executor.forward(xh, Ctx(), keep=False)


def network_steps(name: str, batch: int, train: bool):
    """(ours, torch's) step callables for a zoo network at this batch, same weights and data."""
    from cnnc.runtime.bench import torch_step

    model, xh, yh, config = network_inputs(name, batch)
    return our_step(model, xh, yh, train, config), torch_step(model, xh, yh, train, config)


def onnxruntime_steps(name: str, batch: int):
    """(ours, onnxruntime's) inference step callables for a zoo network: our -O2 plan, and its ONNX
    export in onnxruntime with our thread count; same weights and data."""
    from cnnc.backends.base import Ctx
    from cnnc.runtime.artifact import compile_model
    from cnnc.runtime.bench import our_threads
    from cnnc.runtime.model import Model
    from cnnc.runtime.peers import onnxruntime_session

    model = Model.load(EXAMPLES / f"{name}.cnn")
    xh = np.random.default_rng(0).normal(size=(batch, *model.input_shape)).astype(np.float32)
    compiled = compile_model(model, 2)
    sess, _ = onnxruntime_session(model, our_threads(model))
    feed = {sess.get_inputs()[0].name: xh}
    return lambda: compiled.executor.forward(xh, Ctx(), keep=False), lambda: sess.run(None, feed)


def lenet5_trainings():
    """(ours, the plain path's) callables that each run `cnnc train examples/lenet5.cnn` (its own
    15 epochs of MNIST-5k) into a fresh run directory: the -O2 training plan with the compiled
    loops as the environment allows, and the plain training plan with CNNC_JIT=0."""
    import tempfile

    from cnnc.runtime import api

    def training(opt_level: int, jit: str | None):
        def run():
            saved = dict(os.environ)
            if jit is not None:
                os.environ["CNNC_JIT"] = jit
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    trainer, _ = api.prepare(EXAMPLES / "lenet5.cnn", run_dir=Path(tmp) / "run", progress=False,
                                             opt_level=opt_level)
                    api.run(trainer)
            finally:
                os.environ.clear()
                os.environ.update(saved)
        return run
    return training(2, None), training(0, "0")


def conv256_steps():
    """The 256→256 3×3 conv at 56×56, batch 8, forward only (no bias), ours and torch's."""
    import torch

    from cnnc.backends.base import Ctx, NodeInfo
    from cnnc.backends.numpy.conv import conv_forward
    from cnnc.compiler.ops import OPS, resolve_pads

    attrs = OPS["conv"].attrs(filters=256, kernel=3, pad=1, bias=False)
    node = NodeInfo(1, "conv", "conv", attrs, ((256, 56, 56),), (256, 56, 56),
                    resolve_pads(attrs.pad, 56, 56, attrs.kernel, attrs.stride))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 256, 56, 56)).astype(np.float32)
    w = (rng.normal(size=(256, 256, 3, 3)) * 0.02).astype(np.float32)
    xt, wt = torch.tensor(x), torch.tensor(w)
    ctx = Ctx()

    def theirs():
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, padding=1)
    ours = lambda: conv_forward(node, [x], {"weight": w}, ctx)[0]  # noqa: E731
    err = float(np.abs(ours() - theirs().numpy()).max())
    return ours, theirs, err


ROWS = [  # key, label, kind, goal (ratio of times; for conv256 of GFLOP/s), how to compare
    ("lenet5", "LeNet-5 training step, batch 64", ("lenet5", 64, True), 0.5, "time ≤"),
    ("resnet20", "ResNet-20 training step, batch 128", ("resnet20_cifar", 128, True), 1.0, "time ≤"),
    ("conv256", "conv 256→256 3×3 56×56 b8 forward", None, 0.8, "GFLOP/s ≥"),
    ("resnet50_b1", "ResNet-50 inference, batch 1", ("resnet50", 1, False), None, "time"),
    ("resnet50_b16", "ResNet-50 inference, batch 16", ("resnet50", 16, False), None, "time"),
    # depthwise-separable networks: depthwise convs, 1×1 convs, BatchNorm and activations
    ("mobilenet_v2_b1", "MobileNetV2 inference, batch 1", ("mobilenet_v2", 1, False), 1.5, "time ≤"),
    ("mobilenet_v2_b32", "MobileNetV2 training step, batch 32", ("mobilenet_v2", 32, True), 1.0, "time ≤"),
    ("efficientnet_b0_b1", "EfficientNet-B0 inference, batch 1", ("efficientnet_b0", 1, False), 1.5, "time ≤"),
    ("efficientnet_b0_b32", "EfficientNet-B0 training step, batch 32", ("efficientnet_b0", 32, True), 1.5,
     "time ≤"),
    # the peer is onnxruntime on our ONNX export
    ("resnet50_ort_b1", "ResNet-50 inference vs onnxruntime, batch 1",
     lambda: onnxruntime_steps("resnet50", 1), 1.0, "time ≤"),
    ("resnet50_ort_b16", "ResNet-50 inference vs onnxruntime, batch 16",
     lambda: onnxruntime_steps("resnet50", 16), 1.0, "time ≤"),
    ("mobilenet_v2_ort_b1", "MobileNetV2 inference vs ort, batch 1",
     lambda: onnxruntime_steps("mobilenet_v2", 1), 1.0, "time ≤"),
    ("efficientnet_b0_ort_b1", "EfficientNet-B0 inference vs ort, b1",
     lambda: onnxruntime_steps("efficientnet_b0", 1), 1.0, "time ≤"),
    # whole trainings, one a round each side; the peer is the plain path
    ("lenet5_train", "cnnc train lenet5, 15 epochs (vs plain)", lenet5_trainings, 0.5, "time ≤"),
]
ONE_SHOT = {"lenet5_train"}  # rows whose steps are whole runs: no warm-up, one repeat a round
SLOW_STEP_MS = 1000  # rows whose steps take longer are timed with fewer repeats per round
# Each side's timing starts this long after the other's: both leave threads spinning after their
# calls (OpenBLAS's for ~0.1 s once cnnc has given it two threads at batch 1, onnxruntime's and
# PyTorch's OpenMP ones), which took the cores from the side timed next. MobileNetV2 at batch 1 in
# onnxruntime, median of 5 right after 5 of ours, 3 rounds: 4.2-7.9 ms with no pause, 6.8-14.9
# after 10 and 50 ms, 3.4-3.8 after 0.2 and 0.5 s (ours after onnxruntime: 12.0-14.0 against 11.7).
SETTLE_S = 0.25
CONV256_FLOP = 2 * 8 * 56 * 56 * 256 * 256 * 9


def measure(key: str, spec, rounds: int, repeats: int) -> dict:
    from cnnc.runtime.bench import _median_ms
    note = ""
    if spec is None:
        ours, theirs, err = conv256_steps()
        note = f"max |ours − torch| {err:.1e}"
    else:
        ours, theirs = spec() if callable(spec) else network_steps(*spec)
    if key in ONE_SHOT:
        repeats = 1
    else:
        for fn in (ours, theirs, ours, theirs):  # warm-up: allocations, thread pools, caches
            fn()
        if _median_ms(ours, 1, 0) > SLOW_STEP_MS:  # seconds-long training steps: rounds matter more than repeats
            repeats = min(repeats, 2)
    ours_ms, theirs_ms, ratios = [], [], []
    for _ in range(rounds):
        time.sleep(SETTLE_S)
        a = _median_ms(ours, repeats, 0)
        time.sleep(SETTLE_S)
        b = _median_ms(theirs, repeats, 0)
        ours_ms.append(a)
        theirs_ms.append(b)
        ratios.append(a / b)
    row = {"key": key, "ours_ms": statistics.median(ours_ms), "torch_ms": statistics.median(theirs_ms),
           "ratio": statistics.median(ratios), "spread": [min(ratios), max(ratios)], "note": note,
           "repeats": repeats}
    if spec is None:  # a throughput row: GFLOP/s, and the ratio ours/torch of GFLOP/s
        row["ours_gflops"] = CONV256_FLOP / row["ours_ms"] / 1e6
        row["torch_gflops"] = CONV256_FLOP / row["torch_ms"] / 1e6
        row["ratio"] = statistics.median(1 / r for r in ratios)
        row["spread"] = [1 / max(ratios), 1 / min(ratios)]
    return row


def machine() -> str:
    import torch
    from cnnc.backends.numpy import blas, parallel
    return (f"{parallel.cpu_model()}, {os.cpu_count()} CPUs, cnnc threads {parallel.get_threads()}, torch {torch.__version__} "
            f"threads {torch.get_num_threads()}, numpy {np.__version__} (OpenBLAS kernels {blas.core_name()}), "
            f"Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per row (default 5)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per side per round (default 5)")
    ap.add_argument("--only", help="comma-separated row keys: " + ",".join(r[0] for r in ROWS))
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("cpu.py: the peer needs PyTorch (pip install torch)", file=sys.stderr)
        return 2
    from cnnc.backends.numpy import NumpyBackend
    NumpyBackend()  # thread and BLAS settings as `cnnc train` has them
    keys = set(args.only.split(",")) if args.only else {r[0] for r in ROWS}
    rows = []
    for key, label, spec, goal, how in ROWS:
        if key not in keys:
            continue
        row = measure(key, spec, args.rounds, args.repeats)
        row.update(label=label, goal=goal, how=how)
        if goal is not None:
            row["met"] = row["ratio"] <= goal if how.startswith("time") else row["ratio"] >= goal
        rows.append(row)
        print(f"  measured {label}: ratio {row['ratio']:.2f}", file=sys.stderr, flush=True)
    print(f"machine: {machine()}")
    print(f"{'':38}{'cnnc':>12}{'peer':>12}{'ratio':>8}  {'(spread)':<13}{'goal':<14}")
    for r in rows:
        if "ours_gflops" in r:
            a, b = f"{r['ours_gflops']:.0f} GFLOP/s", f"{r['torch_gflops']:.0f} GFLOP/s"
        else:
            a, b = f"{r['ours_ms']:.1f} ms", f"{r['torch_ms']:.1f} ms"
        goal = f"{r['how']} {r['goal']}" if r["goal"] is not None else "report"
        verdict = "" if r["goal"] is None else ("  met" if r["met"] else "  NOT met")
        spread = f"({r['spread'][0]:.2f}–{r['spread'][1]:.2f})"
        print(f"{r['label']:<38}{a:>12}{b:>12}{r['ratio']:>8.2f}  {spread:<13}{goal:<14}{verdict}")
        if r["note"]:
            print(f"{'':38}{r['note']}")
    print("peer: PyTorch, or onnxruntime where the row says so (the plain path for cnnc train); ratio: cnnc time / peer time (conv row: cnnc "
          "GFLOP/s / PyTorch GFLOP/s); median over "
          f"{args.rounds} alternating rounds of {args.repeats} steps each "
          f"({min(args.repeats, 2)} where a step takes over {SLOW_STEP_MS / 1000:g} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
