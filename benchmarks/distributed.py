"""Data parallelism on this machine: MPI allreduce bandwidth, and what 2 ranks add to a ResNet-20 step.

    python benchmarks/distributed.py                  # launches itself under mpiexec -n 2
    python benchmarks/distributed.py --ranks 2 --steps 8 --json results/distributed.json

Rows:
  allreduce of 1, 4, 16, 64 and 100 MB of float32 (runtime/distributed.py's bucketed, polled
  allreduce, as training uses it): median time, algorithm bandwidth (bytes / time) and bus
  bandwidth (2(N-1)/N x bytes / time, the ring's traffic per link: the figure docs/distributed.md's
  model uses); beside it MPI's own blocking Allreduce of the same buffer, without the timeout.
  ResNet-20 (examples/cifar_resnet20.cnn) training step at 32 images a rank, one BLAS thread a rank:
  compute (forward, loss, backward), waiting (a barrier before the allreduce: the ranks' skew) and
  allreduce of the 0.27 M gradients, per step, median over the steps; overhead = (waiting +
  allreduce) / compute.
The load average is printed with the figures: other processes on a shared machine stretch all three.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES_MB = (1, 4, 16, 64, 100)


def worker(args) -> None:
    from cnnc.backends.base import Ctx
    from cnnc.runtime.distributed import world
    from cnnc.runtime.executor import Executor
    from cnnc.runtime.model import Model
    from cnnc.runtime.train import _logits_plan

    comm = world()
    n = comm.size
    rows = []
    for mb in SIZES_MB:
        buf = np.ones(mb * 1024 * 1024 // 4, dtype=np.float32)
        times = []
        for _ in range(args.reps):
            comm.barrier()
            t = time.perf_counter()
            comm.allreduce([buf])
            times.append(time.perf_counter() - t)
        native = []
        for _ in range(args.reps):  # MPI's own blocking Allreduce: what the timeout's polling costs
            comm.barrier()
            t = time.perf_counter()
            comm.comm.Allreduce(comm.MPI.IN_PLACE, buf)
            native.append(time.perf_counter() - t)
        t, tn = statistics.median(times), statistics.median(native)
        nbytes = buf.nbytes
        rows.append({"MB": mb, "seconds": t, "algbw_GBps": nbytes / t / 1e9,
                     "busbw_GBps": 2 * (n - 1) / n * nbytes / t / 1e9, "blocking_seconds": tn,
                     "blocking_busbw_GBps": 2 * (n - 1) / n * nbytes / tn / 1e9})

    model = Model.load(ROOT / "examples" / "cifar_resnet20.cnn", "numpy", 0)
    plan = _logits_plan(model.plan, "cross_entropy")
    ex = Executor(plan, model.backend, model.params)
    loss_fn = model.backend.loss("cross_entropy")
    trainable = [k for k, t in model.trainable().items() if t]
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    compute, wait, reduce = [], [], []
    grad_bytes = 0
    for step in range(args.steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        out = ex.forward(x, Ctx(training=True))
        _, dout = loss_fn(out, y)
        grads = ex.backward(dout)
        t1 = time.perf_counter()
        comm.barrier()
        t2 = time.perf_counter()
        bufs = [np.array(grads[k], dtype=np.float32) for k in reversed(list(model.params)) if k in grads
                and k in trainable]
        comm.allreduce(bufs)
        t3 = time.perf_counter()
        grad_bytes = sum(b.nbytes for b in bufs)
        if step:
            compute.append(t1 - t0), wait.append(t2 - t1), reduce.append(t3 - t2)
    step_row = {"ranks": n, "batch_per_rank": args.batch, "gradient_MB": grad_bytes / 2**20,
                "compute_s": statistics.median(compute), "waiting_s": statistics.median(wait),
                "allreduce_s": statistics.median(reduce)}
    step_row["overhead"] = (step_row["waiting_s"] + step_row["allreduce_s"]) / step_row["compute_s"]
    if comm.rank == 0:
        result = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "ranks": n, "allreduce": rows,
                  "resnet20_step": step_row}
        print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="images a rank (default 32)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "CNNC_THREADS": "1"}
    cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(args.ranks), sys.executable, __file__,
           "--worker", "--steps", str(args.steps), "--reps", str(args.reps), "--batch", str(args.batch)]
    before = os.getloadavg()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["load_average_before"] = before
    print(f"{args.ranks} ranks on {result['cpus']} CPUs; load average before {before[0]:.1f}, "
          f"after {result['load_average'][0]:.1f} (1-minute)")
    print(f"{'allreduce':>10} {'time':>10} {'algbw':>10} {'busbw':>10}   {'MPI_Allreduce':>13} {'busbw':>10}")
    for r in result["allreduce"]:
        print(f"{r['MB']:>7} MB {1e3 * r['seconds']:>8.2f}ms {r['algbw_GBps']:>6.2f}GB/s {r['busbw_GBps']:>6.2f}GB/s"
              f"   {1e3 * r['blocking_seconds']:>11.2f}ms {r['blocking_busbw_GBps']:>6.2f}GB/s")
    s = result["resnet20_step"]
    print(f"ResNet-20 step, {s['batch_per_rank']} images a rank, {s['gradient_MB']:.2f} MB of gradients: "
          f"compute {1e3 * s['compute_s']:.1f} ms, waiting {1e3 * s['waiting_s']:.1f} ms, "
          f"allreduce {1e3 * s['allreduce_s']:.2f} ms: overhead {100 * s['overhead']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
