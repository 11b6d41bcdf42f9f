"""Convolution algorithm choice by measurement against the heuristic, on this CPU, in one process.

Each round runs one step with the tuner off (the heuristic's algorithms), then with `fast` and
`full` (backends/numpy/tuner.py), so that the machine's changing load hits every mode alike;
a row is the median step time per mode and the ratio tuned / heuristic. The tuning itself
happens in the untimed warm-up steps. Training rows time forward, loss, backward and an
SGD-momentum update on the training plan `cnnc train` runs; inference rows the -O2 plan.

    python benchmarks/cpu_tuner.py                       # ResNet-20 training b128, ResNet-50 inference b1
    python benchmarks/cpu_tuner.py --rounds 8 --only resnet20_cifar:128:train
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["resnet20_cifar:128:train", "resnet50:1:infer", "resnet50:16:infer"]
MODES = ("off", "fast", "full")


def step_fn(net: str, batch: int, train: bool):
    from cnnc.backends.base import Ctx
    from cnnc.compiler.train_config import TrainConfig
    from cnnc.runtime import bench
    from cnnc.runtime.artifact import compile_model
    from cnnc.runtime.model import Model

    rng = np.random.default_rng(0)
    model = Model.load(ROOT / "examples" / f"{net}.cnn", "numpy")
    x = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
    if train:
        y = rng.integers(0, int(model.classes), batch)
        config = TrainConfig(optimizer="momentum", momentum=0.9, lr=0.001, batch=batch)
        return bench._train_step(model, x, y, config)
    compiled = compile_model(model, 2)
    return lambda: compiled.executor.forward(x, Ctx(), keep=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--only", help="comma-separated rows NETWORK:BATCH:train|infer (default: " + ",".join(ROWS) + ")")
    args = ap.parse_args()
    rows = args.only.split(",") if args.only else ROWS
    # a fresh cache, so that every choice is timed in this run
    os.environ["CNNC_TUNING_CACHE"] = str(Path(tempfile.mkdtemp(prefix="cnnc-tuner-")) / "tuning.json")
    print(f"{'row':32} " + " ".join(f"{m:>10}" for m in MODES) + "   fast/off  full/off")
    for row in rows:
        net, batch, kind = row.split(":")
        step = step_fn(net, int(batch), kind == "train")
        times = {m: [] for m in MODES}
        for m in MODES:  # warm-up: the tuned modes time their candidates here
            os.environ["CNNC_AUTOTUNE"] = m
            step()
            step()
        for _ in range(args.rounds):
            for m in MODES:
                os.environ["CNNC_AUTOTUNE"] = m
                t0 = time.perf_counter()
                step()
                times[m].append(time.perf_counter() - t0)
        med = {m: 1000 * statistics.median(t) for m, t in times.items()}
        print(f"{row:32} " + " ".join(f"{med[m]:8.1f}ms" for m in MODES)
              + f"   {med['fast'] / med['off']:8.2f}  {med['full'] / med['off']:8.2f}", flush=True)
    print(f"median of {args.rounds} alternating rounds; off: the heuristic's algorithms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
