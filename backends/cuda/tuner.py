"""Choose a tile configuration per problem on first use, and remember the choice on disk.

The cache is a JSON file (default ~/.cache/cnnc/tuning.json, or CNNC_TUNING_CACHE) keyed by
GPU name, CUDA version, kernel version and the problem. Modes (`--autotune`): `off` takes the
heuristic's first candidate; `fast` times the first three candidates; `full` times them all.
Timing uses CUDA events around a few launches after a warm-up.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .source import KERNEL_VERSION

MODE = os.environ.get("CNNC_AUTOTUNE", "fast")
MODES = ("off", "fast", "full")


def cache_path() -> Path:
    return Path(os.environ.get("CNNC_TUNING_CACHE", Path.home() / ".cache" / "cnnc" / "tuning.json"))


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _store(data: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temporary file per process and thread: several processes tuning at once (parallel test workers,
    # two training runs) each replace the cache whole and never rename another's half-written file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def device_key() -> str:
    from .device import cupy
    cp = cupy()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"{name}|cuda{cp.cuda.runtime.runtimeGetVersion()}|k{KERNEL_VERSION}"


def choose(problem: str, candidates: list, time_candidate, mode: str | None = None):
    """The best of `candidates` for `problem`; `time_candidate(c)` returns seconds per launch."""
    mode = mode or MODE
    if mode not in MODES:
        raise ValueError(f"autotune mode {mode!r}; choose one of {MODES}")
    if mode == "off" or len(candidates) == 1:
        return candidates[0]
    key = f"{device_key()}|{problem}"
    data = _load()
    if key in data and data[key]["config"] in [repr(c) for c in candidates]:
        return next(c for c in candidates if repr(c) == data[key]["config"])
    pool = candidates[:3] if mode == "fast" else candidates
    timed = []
    for c in pool:
        try:
            timed.append((time_candidate(c), c))
        except Exception:  # a configuration that does not fit this GPU (registers, shared memory)
            continue
    if not timed:
        return candidates[0]
    seconds, best = min(timed, key=lambda t: t[0])
    data[key] = {"config": repr(best), "seconds": seconds, "mode": mode}
    _store(data)
    return best


def time_launches(launch, repeats: int = 5) -> float:
    """Median seconds of `launch()` measured with CUDA events after one warm-up launch."""
    from .device import cupy
    cp = cupy()
    launch()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1000.0)
    times.sort()
    return times[len(times) // 2]
