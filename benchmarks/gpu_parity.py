"""`cnnc parity` of one network many times, with the tuner off and on: a fault that comes and goes
(a race, a read of unwritten memory, one tuned configuration among several) shows as runs that
disagree with each other. `--layerwise` judges each layer on the reference's own inputs and
output gradient instead (`cnnc parity --local`, what the GPU zoo test runs): whole-network parity
also flags ReLU masks that differ by rounding (VGG-19 at 64x64, see NOTES.md); both are printed
when both are asked for (`--compare whole,layer`).

Every run builds a fresh CUDA model, forgets the configurations chosen in this process
(`conv._chosen`) and, with the tuner on, starts from an empty tuning cache, so each run tunes
(and so launches every timed candidate) again. Per run: the first layer over, the largest
forward and gradient differences over the floor, and the configuration each conv problem ran
with in each pass; at the end, per mode, how many runs agreed. Exit status 1 when any run has a
layer over, 2 without a GPU.

    python benchmarks/gpu_parity.py examples/vgg19.cnn --size 64x64 --runs 3 --modes off,fast
    python benchmarks/gpu_parity.py examples/vgg19.cnn --runs 2 --compare whole,layer
    python benchmarks/gpu_parity.py examples/lenet5.cnn --size native --backends numpy,numpy  # CPU dry run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def configs_run() -> dict[str, str]:
    """pass|problem -> configuration, of the conv launches the tuner chose in this process."""
    from cnnc.backends.cuda import conv
    out = {}
    for key, cfg in conv._chosen.items():
        _, name, problem, batch = key.split("|")
        out[f"{name}|{problem}|{batch}"] = repr(cfg)
    return out


def layer_run(path: str, backends: tuple[str, str], size, batch: int, mode: str, tolerance: float) -> dict:
    from cnnc.runtime.parity import local_parity, network

    if "cuda" in backends:
        from cnnc.backends.cuda import conv, tuner
        tuner.MODE = mode
        conv._chosen.clear()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CNNC_TUNING_CACHE"] = str(Path(tmp) / "tuning.json")
        t0 = time.perf_counter()
        rows, first_bad = local_parity(network(path, size), backends[1], batch=batch, tolerance=tolerance,
                                       reference=backends[0])
        seconds = time.perf_counter() - t0
    worst = max(((max(r["forward"], r["backward"] or 0.0) / max(tolerance, 10 * r["floor"]), r["layer"])
                 for r in rows), default=(0.0, "-"))
    return {"first_bad": first_bad, "rows": rows, "seconds": seconds, "worst": worst,
            "configs": configs_run() if "cuda" in backends else {}}


def one_run(path: str, backends: tuple[str, str], size, batch: int, mode: str, tolerance: float) -> dict:
    from cnnc.runtime.parity import FLOOR_FACTOR, parity

    if "cuda" in backends:
        from cnnc.backends.cuda import conv, tuner
        tuner.MODE = mode
        conv._chosen.clear()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CNNC_TUNING_CACHE"] = str(Path(tmp) / "tuning.json")  # tune afresh every run
        t0 = time.perf_counter()
        rows, first_bad = parity(path, backends, batch=batch, input_size=size, tolerance=tolerance)
        seconds = time.perf_counter() - t0

    def worst(key, floor_key):
        ratios = [(r[key] / max(tolerance, FLOOR_FACTOR * r[floor_key]), r["layer"]) for r in rows
                  if r[key] is not None]
        return max(ratios, default=(0.0, "-"))

    return {"first_bad": first_bad, "rows": rows, "seconds": seconds, "worst_forward": worst("forward", "forward_floor"),
            "worst_grad": worst("grad", "grad_floor"),
            "configs": configs_run() if "cuda" in backends else {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("network", help="a .cnn file")
    ap.add_argument("--size", default="64x64",
                    help="input HxW the network is rebuilt at (default 64x64; `native`: as written)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="runs per tuner mode (default 3)")
    ap.add_argument("--modes", default="off,fast", help="tuner modes, comma-separated (default off,fast)")
    ap.add_argument("--backends", default="numpy,cuda", help="reference,other (default numpy,cuda)")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--compare", default="whole",
                    help="whole (cnnc parity), layer (each layer on the reference's inputs) or both: whole,layer")
    args = ap.parse_args(argv)
    kinds = args.compare.split(",")
    if any(k not in ("whole", "layer") for k in kinds):
        ap.error("--compare takes whole, layer or whole,layer")

    backends = tuple(args.backends.split(","))
    modes = args.modes.split(",")
    if len(backends) != 2 or any(m not in ("off", "fast", "full") for m in modes):
        ap.error("--backends takes two names; --modes takes off, fast, full")
    size = None
    if args.size != "native":
        h, _, w = args.size.partition("x")
        size = (int(h), int(w or h))
    if "cuda" in backends:
        from cnnc.backends.cuda import device
        if not device.gpu_available():
            print("gpu_parity: needs an NVIDIA GPU with CuPy (or --backends numpy,numpy for a dry run)",
                  file=sys.stderr)
            return 2
    from cnnc.runtime.parity import format_rows

    summary, failed = [], False
    for kind in kinds:
        for mode in modes:
            agree = 0
            for i in range(args.runs):
                run = one_run if kind == "whole" else layer_run
                r = run(args.network, backends, size, args.batch, mode, args.tolerance)
                agree += r["first_bad"] is None
                verdict = "all layers agree" if r["first_bad"] is None else "first over: " + r["first_bad"]
                if kind == "whole":
                    (fr, fl), (gr, gl) = r["worst_forward"], r["worst_grad"]
                    detail = f"largest forward {fr:.2f}x its limit ({fl}), gradient {gr:.2f}x ({gl})"
                else:
                    detail = f"largest difference {r['worst'][0]:.2f}x its limit ({r['worst'][1]})"
                print(f"{kind} tuner {mode} run {i + 1}: {verdict}; {detail}; {r['seconds']:.0f} s", flush=True)
                for key, cfg in sorted(r["configs"].items()):
                    print(f"    {key}: {cfg}")
                if r["first_bad"] is not None:
                    failed = True
                    names = [row["layer"] for row in r["rows"]]
                    at = names.index(r["first_bad"])
                    if kind == "whole":
                        print(format_rows(r["rows"][max(0, at - 3):at + 4], r["first_bad"], backends, args.tolerance))
                    else:
                        for row in r["rows"][max(0, at - 2):at + 3]:
                            print(f"    {row['layer']:32s} forward {row['forward']:.2e} backward "
                                  f"{row['backward'] if row['backward'] is None else format(row['backward'], '.2e')}"
                                  f" floor {row['floor']:.2e}{'  over' if row['bad'] else ''}")
            summary.append(f"{kind} tuner {mode}: {agree} of {args.runs} runs agree")
    print("; ".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
