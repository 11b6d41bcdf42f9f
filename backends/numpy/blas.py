"""The number of threads NumPy's BLAS (OpenBLAS) uses, read and set at run time (best effort).

The convolution kernels make many mid-sized gemm calls. When other processes keep the cores
busy, OpenBLAS's worker threads wait for each other on every call and a conv step can become
tens of times slower; one thread avoids that. Nothing here runs by itself: the caller (the
trainer, a benchmark) decides. Without a recognisable OpenBLAS, the functions do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np

_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")
_lib: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _candidates() -> list[str]:
    """Paths of OpenBLAS libraries loaded in this process (Linux), else those NumPy's wheel ships."""
    paths = []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1]
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    paths += sorted(glob.glob(os.path.join(libs, "*openblas*")))
    return paths


def _openblas() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        _lib = None
        for path in _candidates():
            try:
                lib = ctypes.CDLL(path)  # already loaded by NumPy: the same handle, nothing new
            except OSError:
                continue
            if any(hasattr(lib, s) for s in _SETTERS):
                _lib = lib
                break
    return _lib


def _symbol(names):
    lib = _openblas()
    for name in names if lib is not None else ():
        if hasattr(lib, name):
            return getattr(lib, name)
    return None


def get_threads() -> int | None:
    """OpenBLAS's current thread count, or None when it cannot be read."""
    fn = _symbol(_GETTERS)
    return int(fn()) if fn is not None else None


def set_threads(n: int) -> int | None:
    """Make OpenBLAS use `n` threads (process-wide); returns the previous count, None if unsupported."""
    fn = _symbol(_SETTERS)
    if fn is None:
        return None
    old = get_threads()
    fn(ctypes.c_int(max(int(n), 1)))
    return old


@contextlib.contextmanager
def threads(n: int):
    """`with threads(1): ...` runs the block with `n` BLAS threads, then restores the count."""
    old = set_threads(n)
    try:
        yield
    finally:
        if old is not None:
            set_threads(old)
