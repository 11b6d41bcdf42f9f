"""Choose among a kernel's candidates by timing them on first use, and remember the choice on disk.

Both backends tune this way: CUDA its tile configurations (backends/cuda/tuner.py), NumPy its
convolution algorithms (backends/numpy/tuner.py). The cache is one JSON file (default
~/.cache/cnnc/tuning.json, or CNNC_TUNING_CACHE) keyed by the machine (GPU or CPU, library and
kernel versions) and the problem. Modes (`cnnc --autotune`, or CNNC_AUTOTUNE): `off` takes the
heuristic's first candidate; `fast` times the first three; `full` times them all.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

MODES = ("off", "fast", "full")


def mode_from_env() -> str:
    return os.environ.get("CNNC_AUTOTUNE", "fast")


def checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"autotune mode {mode!r}; choose one of {MODES}")
    return mode


def cache_path() -> Path:
    return Path(os.environ.get("CNNC_TUNING_CACHE", Path.home() / ".cache" / "cnnc" / "tuning.json"))


def load() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}  # a damaged cache is re-tuned, not an error


def store(data: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one temporary file per process and thread: several processes tuning at once (parallel test workers,
        # two training runs) each replace the cache whole and never rename another's half-written file
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice holds for this process only
        pass


def pool(candidates: list, mode: str) -> list:
    """The candidates a mode times."""
    return candidates[:3] if mode == "fast" else candidates


def choose(key: str, candidates: list, time_candidate, mode: str, margin: float = 0.0):
    """The best of `candidates` for the problem `key` (machine included); `time_candidate(c)` returns
    seconds. A candidate that raises is skipped (a configuration that does not fit the device). The
    first (the heuristic's) stays unless another is faster by more than `margin` (a fraction)."""
    if checked_mode(mode) == "off" or len(candidates) == 1:
        return candidates[0]
    data = load()
    entry = data.get(key)
    if isinstance(entry, dict) and entry.get("config") in [repr(c) for c in candidates]:
        return next(c for c in candidates if repr(c) == entry["config"])
    timed = []
    for c in pool(candidates, mode):
        try:
            timed.append((time_candidate(c), c))
        except Exception:  # noqa: BLE001 - any failure rules the candidate out, the others still run
            continue
    if not timed:
        return candidates[0]
    seconds, best = min(timed, key=lambda t: t[0])
    first = next((t for t in timed if t[1] == candidates[0]), None)
    if first is not None and first[0] <= seconds * (1 + margin):
        seconds, best = first
    data = load()  # another process may have stored choices while these were timed
    data[key] = {"config": repr(best), "seconds": seconds, "mode": mode,
                 "timed": {repr(c): s for s, c in timed}}
    store(data)
    return best
