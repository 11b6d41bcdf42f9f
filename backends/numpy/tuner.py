"""Convolution algorithm choice by measurement on this CPU, cached on disk (backends/tuning.py).

The first time a training or inference step meets a convolution problem (input shape, filter
geometry, dtype, training or not, thread count), each algorithm that computes it runs on the
step's own input, forward and (in training) backward, and the fastest is kept for this process
and in the cache. A CPU's choice depends on its caches and its BLAS, which is why the key
names the CPU model, NumPy's version and its BLAS. Problems under MIN_MACS take the
heuristic's choice untimed: their differences are microseconds, their timing would not be.
"""

from __future__ import annotations

import functools
import sys
import time

import numpy as np

from .. import tuning
from . import blas as _blas
from . import parallel

MIN_MACS = 20_000_000  # multiply-adds of one forward pass below which the heuristic decides
ROUNDS_SECONDS = 2.0  # timed rounds stop after this long (at least one round runs)
NOTICE_SECONDS = 1.0  # a warm-up round longer than this prints why the step is slow, once a process
# another algorithm replaces the heuristic's only when this much faster: the timings move by 20–40%
# from run to run here, and the heuristic's choice usually needs less memory in the real step
MARGIN = 0.05
REPEATS = 5  # timed rounds after a warm-up; the median counts
# a candidate whose workspace exceeds both this and twice the heuristic's is not timed: it could take
# memory the training step's estimate did not count
MAX_WORKSPACE_BYTES = 128 << 20
GIVE_UP = 3.0  # a candidate this many times slower than the fastest in the first round is not timed further

_chosen: dict[str, object] = {}


def mode() -> str:
    return tuning.checked_mode(tuning.mode_from_env())


@functools.lru_cache(maxsize=1)
def _machine() -> str:
    try:
        from numpy.__config__ import CONFIG
        blas = CONFIG["Build Dependencies"]["blas"]
        blas = f"{blas.get('name', '')}{blas.get('version', '')}"
    except (ImportError, KeyError, TypeError, AttributeError):  # only a label: NumPy builds differ
        blas = "blas?"
    # OpenBLAS's kernels for this CPU too: OPENBLAS_CORETYPE can pick others (on an AVX-512 AMD
    # EPYC, its Haswell kernels ran sgemm at half the speed of its SkylakeX ones)
    return f"cpu:{parallel.cpu_model()}|numpy{np.__version__}|{blas}-{_blas.core_name()}"


def machine_key() -> str:
    """The machine and the threads: ours, and BLAS's where it has more (where the split gemms are
    off, a batch of one image hands the threads to BLAS: parallel.blas_threads_for)."""
    ours, theirs = parallel.get_threads(), _blas.get_threads() or 1
    return f"{_machine()}|{ours}t" + (f"+blas{theirs}t" if theirs > ours else "")


def choose(problem: str, candidates: list, run_candidate, macs: float):
    """The fastest of `candidates` for `problem`; `run_candidate(c)` computes the problem once with c.
    The first candidate is the heuristic's (what mode `off` and small problems get)."""
    m = mode()
    if m == "off" or len(candidates) == 1 or macs < MIN_MACS:
        return candidates[0]
    key = f"{machine_key()}|{problem}"
    memo = f"{m}|{key}"
    if memo not in _chosen:
        medians: dict = {}

        def seconds(c):
            if not medians:  # timed together on the first call, so that a change of load hits all alike
                medians.update(time_round_robin(tuning.pool(candidates, m), run_candidate))
            return medians[c]
        _chosen[memo] = tuning.choose(key, candidates, seconds, m, MARGIN)
    return _chosen[memo]


def time_round_robin(candidates: list, run_candidate) -> dict:
    """Median seconds of each candidate over up to REPEATS rounds that run every candidate once in
    turn, after an untimed warm-up round (the first run of a problem pays for fresh memory). After
    the first timed round, a candidate GIVE_UP times slower than the fastest keeps that one time and
    leaves the rounds, and the rounds stop once they have taken ROUNDS_SECONDS (large problems get
    one to three); a candidate that raises is left out altogether."""
    start = time.perf_counter()
    ok = []
    for c in candidates:
        try:
            run_candidate(c)
            ok.append(c)
        except Exception:  # noqa: BLE001 - a candidate that cannot run this problem is not chosen
            continue
    if time.perf_counter() - start > NOTICE_SECONDS:
        _notice()
    times: dict = {c: [] for c in ok}
    rounds, timed_from = ok, time.perf_counter()
    for r in range(REPEATS if ok else 0):
        for c in rounds:
            t0 = time.perf_counter()
            run_candidate(c)
            times[c].append(time.perf_counter() - t0)
        if r == 0:
            fastest = min(times[c][0] for c in rounds)
            rounds = [c for c in rounds if times[c][0] <= GIVE_UP * fastest]
        if time.perf_counter() - timed_from > ROUNDS_SECONDS:
            break
    return {c: sorted(t)[len(t) // 2] for c, t in times.items()}


_noticed = False


def _notice() -> None:
    """Say once per process why the first steps are slow: a silent minute of timing looks like a hang."""
    global _noticed
    if not _noticed:
        _noticed = True
        print(f"cnnc: timing convolution algorithms on their first use (kept in {tuning.cache_path()}; "
              "`cnnc --autotune off` skips this)", file=sys.stderr, flush=True)
