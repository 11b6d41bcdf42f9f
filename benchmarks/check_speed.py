"""How fast does the `cnnc` command line answer, measured on this machine?

Times two commands, each run as a fresh subprocess exactly as a user types them:

- `cnnc check examples/densenet201.cnn` (goal: under 1 s): the whole front end on a large network
  (parse, expand blocks, infer shapes, count) plus interpreter start-up and imports;
- `cnnc --help` (goal: under 0.3 s): start-up alone, which must stay light.

A few warm-up runs come first (they fill the OS file cache), then
N timed runs (default 10); the table shows the median and the minimum wall time per command, the
goal, and the ratio median/goal (below 1.0 meets the goal).

This is a script, not a test: wall times depend on the machine, its load and its disks, and vary
from run to run, so a missed goal is printed, never failed. The exit status is 0 whenever the
commands ran; 1 only when one of them itself failed (then there is nothing to time).

    python benchmarks/check_speed.py             # table
    python benchmarks/check_speed.py --json      # one JSON object
    python benchmarks/check_speed.py --runs 20 --warmup 5
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORK = "examples/densenet201.cnn"
FALLBACK = "examples/resnet50.cnn"


def cnnc_command() -> tuple[list[str], str]:
    """The installed `cnnc` console script if on PATH, else this interpreter's `-m cnnc`."""
    exe = shutil.which("cnnc")
    if exe:
        return [exe], exe
    return [sys.executable, "-m", "cnnc"], f"{sys.executable} -m cnnc"


def time_command(argv: list[str], runs: int, warmup: int) -> dict:
    """Wall time of `argv` as a fresh subprocess: `warmup` untimed runs, then `runs` timed ones."""
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
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": runs, "warmup": warmup}


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"nproc": usable, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "python_executable": sys.executable, "platform": platform.platform(),
            "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time `cnnc check` and `cnnc --help` as fresh subprocesses.")
    p.add_argument("--runs", type=int, default=10, help="timed runs per command (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")

    base, shown = cnnc_command()
    notes = []
    network = NETWORK
    if not (ROOT / NETWORK).is_file():
        network = FALLBACK
        notes.append(f"{NETWORK} does not exist (yet): timing {FALLBACK} instead")
    benches = [
        {"name": f"cnnc check {network}", "argv": base + ["check", network], "goal_s": 1.0},
        {"name": "cnnc --help", "argv": base + ["--help"], "goal_s": 0.3},
    ]
    failed = False
    for b in benches:
        b.update(time_command(b["argv"], args.runs, args.warmup))
        if "error" in b:
            failed = True
        else:
            b["ratio"] = b["median_s"] / b["goal_s"]
            b["meets_goal"] = b["median_s"] < b["goal_s"]
        del b["argv"]

    info = machine()
    if args.json:
        print(json.dumps({"cnnc": shown, "machine": info, "notes": notes, "benchmarks": benches}, indent=2))
        return 1 if failed else 0

    print(f"cnnc:    {shown}")
    print(f"machine: nproc {info['nproc']} (of {info['cpu_count']} CPUs), Python {info['python']}, "
          f"{info['platform']}")
    for note in notes:
        print(f"note:    {note}")
    print(f"runs:    {args.warmup} warm-up, {args.runs} timed, each a fresh subprocess; ratio = median / goal")
    print()
    header = ("command", "median", "min", "goal", "ratio", "status")
    rows = []
    for b in benches:
        if "error" in b:
            rows.append((b["name"], "-", "-", f"{b['goal_s']:.2f} s", "-", "FAILED: " + b["error"]))
        else:
            rows.append((b["name"], f"{b['median_s']:.3f} s", f"{b['min_s']:.3f} s", f"{b['goal_s']:.2f} s",
                         f"{b['ratio']:.2f}", "ok" if b["meets_goal"] else "over goal"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        sys.exit(0)
