"""`cnnc train FILE --sweep lr=0.1,0.01,0.001 [--sweep batch=32,64] [--jobs N]`: one training run per
combination of the values, each in its own directory under the sweep's run directory (named after
its values: `lr=0.1,batch=32`), then one figure overlaying their curves (`sweep.png`), a table of
final loss, accuracy and time (runtime/runs.py) and `sweep.json`.

A key is any setting of the `train:` section (TrainConfig's fields; `weight-decay` is read as
`weight_decay`); every value is validated as the file's own settings are before the first run
starts, so a typo fails at once with the key and the allowed keys named. Runs go one after the
other, or `--jobs N` at a time in separate processes (spawned, each with its share of the cores as
CNNC_NUM_THREADS). A run that fails (a diverging learning rate stops training with an error) is
reported in the table with its reason and the others go on: finding such rates is what a sweep
is for. The sweep fails only when no run completes. Ctrl-C stops the whole sweep: the runs in
flight write their checkpoints (each can be continued with `cnnc train --resume DIR/NAME`) and
the runs not yet started are listed as such.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import CnncError, did_you_mean

from .files import dumps, write_text_atomic
from .runs import Run, read_run, table, write_plot
from .train import METRICS

PLOT = "sweep.png"
NOT_STARTED = "not started (interrupted)"
SUMMARY = "sweep.json"


def allowed_keys() -> list[str]:
    return sorted(TrainConfig.model_fields)


def parse_specs(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2` texts as (field, [values]), keys checked against TrainConfig's fields."""
    parsed: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CnncError(f"--sweep {spec}: write KEY=V1,V2,... (e.g. --sweep lr=0.1,0.01,0.001)")
        if key not in TrainConfig.model_fields:
            hint = did_you_mean(key, allowed_keys())
            raise CnncError(f"--sweep {spec}: `{key}` is not a train setting; the keys are the train: settings: "
                            f"{', '.join(allowed_keys())}", hint=hint)
        if any(key == k for k, _ in parsed):
            raise CnncError(f"--sweep {key} is given twice: list all its values in one --sweep {key}=V1,V2,...")
        items = [v.strip() for v in values.split(",")]
        if not all(items):
            raise CnncError(f"--sweep {spec}: an empty value; write {key}=V1,V2,... without spaces or empty items")
        if len(set(items)) != len(items):
            raise CnncError(f"--sweep {spec}: a value is repeated")
        bad = [v for v in items if not re.fullmatch(r"[A-Za-z0-9_.+-]+", v)]
        if bad:
            raise CnncError(f"--sweep {key}={bad[0]}: a sweep value is a number or a word "
                            "(letters, digits, `_.+-`), which also names its run directory")
        parsed.append((key, items))
    return parsed


def _validation_message(exc: ValidationError) -> str:
    msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:]


def combinations(parsed: list[tuple[str, list[str]]], base: TrainConfig, fixed: dict) -> list[tuple[str, dict]]:
    """Every combination as (run name, overrides), each value and each whole combination validated."""
    fixed = {k: v for k, v in fixed.items() if v is not None}
    for key, _ in parsed:
        if key in fixed:
            raise CnncError(f"--sweep {key} and --{key.replace('_', '-')} both set {key}: give one")
    start = base.model_dump()
    for key, values in parsed:
        for v in values:
            try:
                TrainConfig(**{**start, **fixed, key: v})
            except ValidationError as exc:
                raise CnncError(f"--sweep {key}={v}: {_validation_message(exc)}") from None
    out = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in parsed]):
        overrides = dict(combo)
        name = ",".join(f"{k}={v}" for k, v in combo)
        try:
            TrainConfig(**{**start, **fixed, **overrides})
        except ValidationError as exc:
            raise CnncError(f"--sweep: the run {name}: {_validation_message(exc)}") from None
        out.append((name, overrides))
    return out


@dataclass
class SweepResult:
    root: str
    runs: list[Run]
    overrides: list[dict]
    wall_seconds: list[float]
    notes: list[str] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(r.status == "done" for r in self.runs)

    @property
    def interrupted(self) -> bool:
        return any(r.status in ("interrupted", NOT_STARTED) for r in self.runs)

    @property
    def table(self) -> str:
        return table(self.runs)

    def to_json(self) -> dict:
        runs = []
        for r, o, s in zip(self.runs, self.overrides, self.wall_seconds):
            d = r.to_json()
            d.pop("history")
            runs.append({**d, "settings": o, "wall_seconds": s})
        return {"root": self.root, "runs": runs}


_stop = None  # in a worker process: the event the sweep sets on Ctrl-C


def _worker_start(stop) -> None:
    global _stop
    _stop = stop


def _train_one(path: str, run_dir: str, kwargs: dict) -> tuple[str, float]:
    """One run of the sweep (in this process or a spawned one): its status and wall time."""
    from .api import train

    if _stop is not None and _stop.is_set():  # queued before the Ctrl-C, picked up after it
        return NOT_STARTED, 0.0
    t0 = time.perf_counter()
    try:
        result = train(path, run_dir=run_dir, **kwargs)
        status = "interrupted" if result.interrupted else "done"
    except CnncError as exc:
        status = f"failed: {exc.message}"
    return status, time.perf_counter() - t0


def sweep(path, specs: list[str], *, jobs: int = 1, run_dir=None, resume=None, progress: bool = True,
          stream=None, **kwargs) -> SweepResult:
    """Train one run per combination of the `KEY=V1,V2` specs under run_dir (default
    runs/NETWORK-sweep[-N]); kwargs are api.prepare's (data, backend, weights, workers, overrides)."""
    from cnnc.compiler.pipeline import check

    from .api import _fresh_run_dir, with_overrides

    stream = stream or sys.stderr
    if resume is not None:
        raise CnncError("--sweep starts new runs; resume each run with --resume RUN_DIR/NAME instead")
    if not specs:
        raise CnncError("--jobs runs the runs of a sweep in parallel: give --sweep KEY=V1,V2,... too")
    if path is None:
        raise CnncError("which .cnn file? give FILE with --sweep")
    parsed = parse_specs(specs)
    graph = check(path)
    base = graph.graph.get("train") or TrainConfig()
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in TrainConfig.model_fields}
    with_overrides(base, overrides)  # the flags themselves, named as flags
    combos = combinations(parsed, base, overrides)
    root = Path(run_dir) if run_dir is not None else _fresh_run_dir(f"{graph.graph['network']}-sweep")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CnncError(f"sweep directory {root} exists and is not empty", hint="choose another -o")
    root.mkdir(parents=True, exist_ok=True)
    fixed = {k: v for k, v in overrides.items() if v is not None}
    calls = [(str(path), str(root / name), {**kwargs, **fixed, **o}) for name, o in combos]
    statuses: list[tuple[str, float]] = []
    say = (lambda text: (stream.write(text + "\n"), stream.flush())) if progress else (lambda text: None)
    if jobs == 1 or len(calls) == 1:
        for i, (p, d, kw) in enumerate(calls):
            if statuses and statuses[-1][0] in ("interrupted", NOT_STARTED):  # Ctrl-C stops the sweep, not one run
                statuses.append((NOT_STARTED, 0.0))
                continue
            say(f"sweep run {i + 1}/{len(calls)}: {combos[i][0]} → {d}")
            statuses.append(_train_one(p, d, {**kw, "progress": progress, "stream": stream}))
            say(f"  {combos[i][0]}: {statuses[-1][0]}")
    else:
        statuses = _parallel(calls, [n for n, _ in combos], min(jobs, len(calls)), say)
    runs = []
    for (name, _), (status, _), (_, d, _) in zip(combos, statuses, calls):
        if (Path(d) / METRICS).exists():
            runs.append(read_run(d, name, status))
        else:
            runs.append(Run(name, d, [], status))
    result = SweepResult(str(root), runs, [o for _, o in combos], [s for _, s in statuses])
    write_text_atomic(root / SUMMARY, dumps(result.to_json(), indent=1))
    result.notes.append(f"summary: {root / SUMMARY}")
    if any(r.history for r in runs):
        result.notes.append(write_plot(runs, root / PLOT))
    if not result.completed and not result.interrupted:
        result.notes.append("error: no run of the sweep completed")
    return result


def _parallel(calls, names, workers: int, say) -> list[tuple[str, float]]:
    """The runs in `workers` spawned processes, the cores shared among them; results in the calls' order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    previous = os.environ.get("CNNC_NUM_THREADS")
    if previous is None:  # the children read it when their backend starts
        os.environ["CNNC_NUM_THREADS"] = str(max(1, cores // workers))
    try:
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(stop,)) as pool:
            futures = [pool.submit(_train_one, p, d, {**kw, "progress": False}) for p, d, kw in calls]
            say(f"sweep: {len(calls)} runs, {workers} at a time")
            results = []
            try:
                for name, f in zip(names, futures):
                    results.append(f.result())
                    say(f"  {name}: {results[-1][0]} ({results[-1][1]:.1f} s)")
            except KeyboardInterrupt:
                stop.set()
                for f in futures:
                    f.cancel()
                # the runs in flight stop at their next batch and write their checkpoints (a terminal's
                # Ctrl-C reached them already; a signal sent to this process alone is passed on)
                for process in list(getattr(pool, "_processes", {}).values()):
                    if process.is_alive():
                        os.kill(process.pid, signal.SIGINT)
                for f in futures[len(results):]:
                    try:
                        results.append((NOT_STARTED, 0.0) if f.cancelled() else f.result())
                    except BaseException:  # stopped before its training loop began
                        results.append(("interrupted", 0.0))
            return results
    finally:
        if previous is None:
            os.environ.pop("CNNC_NUM_THREADS", None)
