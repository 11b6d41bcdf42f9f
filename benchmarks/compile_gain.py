"""What the pass pipeline buys on the NumPy backend: ResNet-50 inference time at -O2 over -O0,
and activation memory with memory planning over without (inference, and a training step).

Not a test: timings on a shared machine are noisy. Medians of timed repeats after a warm-up.
Usage: python benchmarks/compile_gain.py [--network examples/resnet50.cnn] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from cnnc.compiler.pipeline import PassContext, optimize
from cnnc.compiler.summary import human_bytes
from cnnc.runtime.artifact import compile_model
from cnnc.runtime.model import Model

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def where_time_goes(cm, x, top: int = 6) -> list[tuple[str, float]]:
    """Per-op time share of one forward (kernels timed one by one)."""
    from cnnc.backends.base import Ctx
    plan, be = cm.plan, cm.backend
    values = {plan.input: x}
    spent: dict[str, float] = {}
    for i, step in enumerate(plan.steps):
        xs = [values[u] for u in step.inputs]
        t = time.perf_counter()
        y, _ = step.kernel.forward(step.node, xs, cm.executor._step_params(i), Ctx())
        spent[step.node.op] = spent.get(step.node.op, 0.0) + time.perf_counter() - t
        values[step.node.id] = y
    total = sum(spent.values())
    return sorted(((op, s / total) for op, s in spent.items()), key=lambda kv: -kv[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", default=str(ROOT / "examples" / "resnet50.cnn"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = Model.load(args.network)
    rng = np.random.default_rng(0)
    rows, results = [], {"network": model.name, "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
                         "speed": [], "memory": []}
    plain, fast = compile_model(model, 0), compile_model(model, 2)
    for batch in [int(b) for b in args.batches.split(",")]:
        x = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
        t0 = median_time(lambda: plain(x), args.repeats)
        t2 = median_time(lambda: fast(x), args.repeats)
        results["speed"].append({"batch": batch, "O0_ms": 1000 * t0, "O2_ms": 1000 * t2, "speedup": t0 / t2,
                                 "goal": 1.3, "O0_time_share": where_time_goes(plain, x),
                                 "O2_time_share": where_time_goes(fast, x)})
    for mode, batch in (("inference", 1), ("inference", 16), ("training", 16)):
        ctx = type(model.backend).configure(PassContext(mode=mode, batch=batch))
        mem = optimize(model.graph, ctx, model.host_params()).graph["memory"]
        results["memory"].append({"mode": mode, "batch": batch, "unplanned": mem["unplanned_bytes"],
                                  "planned": mem["planned_bytes"],
                                  "ratio": mem["planned_bytes"] / mem["unplanned_bytes"], "goal": 0.6})
    if args.json:
        print(json.dumps(results))
        return
    print(f"network {model.name}, NumPy backend, {results['machine']}, medians of {args.repeats} runs")
    print(f"{'inference':<22}{'-O0':>10}{'-O2':>10}{'speed-up':>10}{'goal':>7}  status")
    for s in results["speed"]:
        status = "ok" if s["speedup"] >= s["goal"] else "below goal"
        print(f"{'batch ' + str(s['batch']):<22}{s['O0_ms']:>8.1f}ms{s['O2_ms']:>8.1f}ms{s['speedup']:>9.2f}×"
              f"{s['goal']:>6.1f}×  {status}")
    for s in results["speed"]:
        share = lambda items: ", ".join(f"{op} {100 * f:.0f}%" for op, f in items)  # noqa: E731
        print(f"  batch {s['batch']} time by op, -O0: {share(s['O0_time_share'])}")
        print(f"  batch {s['batch']} time by op, -O2: {share(s['O2_time_share'])}")
    print(f"\n{'activation memory':<22}{'unplanned':>12}{'planned':>12}{'ratio':>8}{'goal':>7}  status")
    for m in results["memory"]:
        status = "ok" if m["ratio"] <= m["goal"] else "above goal"
        print(f"{m['mode'] + ' batch ' + str(m['batch']):<22}{human_bytes(m['unplanned']):>12}"
              f"{human_bytes(m['planned']):>12}{100 * m['ratio']:>7.0f}%{100 * m['goal']:>6.0f}%  {status}")


if __name__ == "__main__":
    main()
