"""Keep freed memory in the process for reuse (glibc malloc tuning, best effort).

A training step allocates and frees the same large arrays every time (im2col columns, padded
copies, gradients). By default glibc serves each from a fresh mmap and returns it on free, so
every step page-faults it in again: on a two-core machine that was a third of a ResNet-20 step
in system time. Raising the mmap and trim thresholds lets freed blocks be reused; the process
then keeps its peak memory until it exits, as a training process wants anyway.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; False where that is not possible (not glibc)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # only glibc has them
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # some glibc versions cap the mmap threshold at 32 MiB: take the largest they accept
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, _LIMIT) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    trim_ok = mallopt(_M_TRIM_THRESHOLD, _LIMIT)
    _done = bool(mmap_ok and trim_ok)
    return _done
