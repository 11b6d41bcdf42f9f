"""How fast does `cnnc viz` draw a large network, measured on this machine?

Times `cnnc viz examples/densenet201.cnn -o OUT.svg` (goal: under 10 s) as a fresh subprocess,
exactly as a user types it: interpreter start-up, the front end, building the DOT text and
Graphviz's layout and SVG rendering. One warm-up run comes first, then N timed runs (default 3);
the table shows the median and minimum wall time, the goal and the ratio median/goal (below 1.0
meets the goal). A second table splits one run, in this process, into its stages (check, DOT
text, Graphviz) so a slow run says where the time went.

This is a script, not a test: a missed goal is printed, never failed. It exits 0 whenever the
command ran, 1 when it failed, and 0 with a note when Graphviz's `dot` is not installed (then
there is nothing to time).

    python benchmarks/viz_speed.py              # tables
    python benchmarks/viz_speed.py --json       # one JSON object
    python benchmarks/viz_speed.py --runs 5 --network examples/resnet152.cnn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORK = "examples/densenet201.cnn"
GOAL_S = 10.0


def cnnc_command() -> tuple[list[str], str]:
    exe = shutil.which("cnnc")
    if exe:
        return [exe], exe
    return [sys.executable, "-m", "cnnc"], f"{sys.executable} -m cnnc"


def time_command(argv: list[str], runs: int, warmup: int) -> dict:
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            return {"error": f"exit status {proc.returncode}: " + (err[-1] if err else "(no output)")}
        if i >= warmup:
            times.append(elapsed)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": runs,
            "warmup": warmup}


def stages(network: str, out: Path) -> dict:
    """One run split into its stages, in this process (no start-up)."""
    from cnnc.compiler import viz

    t0 = time.perf_counter()
    g = viz.load_graph(ROOT / network)
    t1 = time.perf_counter()
    dot_text = viz.to_dot(g, viz.VizOptions())
    t2 = time.perf_counter()
    viz.run_dot(dot_text, "svg", out)
    t3 = time.perf_counter()
    return {"check_s": t1 - t0, "dot_text_s": t2 - t1, "graphviz_s": t3 - t2, "layers": g.number_of_nodes(),
            "blocks": len(g.graph["blocks"]), "dot_bytes": len(dot_text), "svg_bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time `cnnc viz NETWORK -o OUT.svg` as a fresh subprocess.")
    p.add_argument("--network", default=NETWORK, help=f"the .cnn file (default {NETWORK})")
    p.add_argument("--runs", type=int, default=3, help="timed runs (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")

    info = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}
    dot = shutil.which("dot")
    if dot is None:
        note = "Graphviz's `dot` is not installed (apt-get install graphviz): nothing to time"
        print(json.dumps({"skipped": note, "machine": info}) if args.json else f"skipped: {note}")
        return 0
    version = subprocess.run([dot, "-V"], capture_output=True, text=True).stderr.strip()
    base, shown = cnnc_command()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "viz.svg"
        bench = {"name": f"cnnc viz {args.network} -o x.svg", "goal_s": GOAL_S}
        bench.update(time_command(base + ["viz", args.network, "-o", str(out)], args.runs, args.warmup))
        if "error" not in bench:
            bench["ratio"] = bench["median_s"] / GOAL_S
            bench["meets_goal"] = bench["median_s"] < GOAL_S
            split = stages(args.network, Path(tmp) / "stages.svg")
        else:
            split = None
    if args.json:
        print(json.dumps({"cnnc": shown, "graphviz": version, "machine": info, "benchmark": bench, "stages": split},
                         indent=2))
        return 1 if "error" in bench else 0

    print(f"cnnc:     {shown}")
    print(f"graphviz: {version}")
    print(f"machine:  nproc {info['nproc']}, Python {info['python']}, {info['platform']}")
    print(f"runs:     {args.warmup} warm-up, {args.runs} timed, each a fresh subprocess; ratio = median / goal")
    print()
    if "error" in bench:
        print(f"{bench['name']}: FAILED: {bench['error']}")
        return 1
    header = ("command", "median", "min", "goal", "ratio", "status")
    row = (bench["name"], f"{bench['median_s']:.2f} s", f"{bench['min_s']:.2f} s", f"{GOAL_S:.0f} s",
           f"{bench['ratio']:.2f}", "ok" if bench["meets_goal"] else "over goal")
    widths = [max(len(a), len(b)) for a, b in zip(header, row)]
    for r in (header, tuple("-" * w for w in widths), row):
        print("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    print()
    print(f"one run in-process ({split['layers']} layers, {split['blocks']} block instances, "
          f"DOT {split['dot_bytes'] / 1e6:.2f} MB → SVG {split['svg_bytes'] / 1e6:.2f} MB): "
          f"check {split['check_s']:.2f} s, DOT text {split['dot_text_s']:.2f} s, "
          f"Graphviz {split['graphviz_s']:.2f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
