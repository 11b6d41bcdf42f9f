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

from cpu import network_inputs, our_step  # benchmarks/cpu.py: the same networks, inputs and steps
ROWS = ["resnet20_cifar:128:train", "resnet50:1:infer", "resnet50:16:infer"]
MODES = ("off", "fast", "full")


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
        model, xh, yh, config = network_inputs(net, int(batch))
        step = our_step(model, xh, yh, kind == "train", config)
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
