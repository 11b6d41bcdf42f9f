"""Whether the NumPy backend's compiled loops (`jit_loops.py`, Numba) run, and the loops themselves.

Numba is the optional extra `[jit]`; it is imported on the first kernel call that could use it,
never at import time. `CNNC_JIT=0` keeps every kernel on the plain NumPy path (the reference the
tests compare against); without Numba installed that path is the only one, silently, since the
results are the same. Numba's threads follow the backend's worker threads (`parallel.py`), and its
threading layer is its own work queue: the OpenMP layer's threads spin between calls (a 0.35 ms
pool took 4.4 ms of CPU time on two cores), and nothing here calls a loop from two threads at once.
"""

from __future__ import annotations

import os

from . import parallel

_loops = None  # the jit_loops module once imported; False when Numba is missing
_threads = 0


def enabled() -> bool:
    """CNNC_JIT is not 0 and Numba can be imported."""
    return os.environ.get("CNNC_JIT", "1").strip() != "0" and _module() is not None


def _module():
    global _loops
    if _loops is None:
        try:
            import numba
            numba.config.THREADING_LAYER = "workqueue"  # read at the first parallel launch
            from . import jit_loops
        except ImportError:
            _loops = False
        else:
            _loops = jit_loops
    return _loops or None


def loops(work: float):
    """The compiled loops' module, Numba's threads set for a loop of `work` operations: the
    backend's threads, or one below parallel.MIN_WORK (waking a second thread costs more than it
    saves on small arrays). Call only where enabled() said yes."""
    global _threads
    want = parallel.get_threads() if work >= parallel.MIN_WORK else 1
    if want != _threads:
        import numba
        numba.set_num_threads(max(1, min(want, numba.config.NUMBA_NUM_THREADS)))
        _threads = want
    return _module()
