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


_CORENAMES = ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename")


def core_name() -> str:
    """The kernels OpenBLAS chose for this CPU ("SkylakeX", "Haswell", ...), or "?" where it does not say."""
    fn = _symbol(_CORENAMES)
    if fn is None:
        return "?"
    fn.restype = ctypes.c_char_p
    return (fn() or b"?").decode(errors="replace")


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


# ---- gemm on strided views ---------------------------------------------------------------------
# numpy.matmul wants contiguous operands and cannot accumulate into its output. The shifted-window
# convolution multiplies column ranges of one buffer (row stride ≠ width) and sums nine products
# into one output, so it calls OpenBLAS's cblas gemm directly: any row stride, C = αAB + βC.

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_GEMM_NAMES = {np.dtype(np.float32): ("scipy_cblas_sgemm64_", "cblas_sgemm64_", "cblas_sgemm"),
               np.dtype(np.float64): ("scipy_cblas_dgemm64_", "cblas_dgemm64_", "cblas_dgemm")}
_gemms: dict = {}


def _gemm_fn(dtype):
    if dtype not in _gemms:
        fn = _symbol(_GEMM_NAMES.get(dtype, ()))
        if fn is not None:
            real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
            # 64-bit integer builds (scipy-openblas64, *64_ symbols) take int64 sizes
            size = ctypes.c_int64 if fn.__name__.endswith("64_") else ctypes.c_int
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, size, size, size, real, ctypes.c_void_p,
                           size, ctypes.c_void_p, size, real, ctypes.c_void_p, size]
            fn.restype = None
        _gemms[dtype] = fn
    return _gemms[dtype]


def _rows(a: np.ndarray) -> tuple[bool, int] | None:
    """(transposed, leading dimension) of a 2-D view BLAS can read in place, else None."""
    item = a.itemsize
    if a.shape[1] == 1 or a.strides[1] == item:
        return False, max(a.strides[0] // item, a.shape[1], 1)
    if a.shape[0] == 1 or a.strides[0] == item:
        return True, max(a.strides[1] // item, a.shape[0], 1)
    return None


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 0.0) -> None:
    """c = a @ b + beta · c for 2-D views whose rows or columns are unit-strided (any leading
    dimension), through BLAS without copies; other cases through NumPy."""
    m, k = a.shape
    n = b.shape[1]
    fn = _gemm_fn(c.dtype) if a.dtype == b.dtype == c.dtype else None
    la, lb, lc = _rows(a), _rows(b), _rows(c)
    if fn is None or la is None or lb is None or lc is None or lc[0] or min(m, n, k) == 0:
        if beta == 0.0:
            np.matmul(a, b, out=c)
        else:
            c *= beta
            c += a @ b
        return
    fn(_ROW_MAJOR, _TRANS if la[0] else _NO_TRANS, _TRANS if lb[0] else _NO_TRANS, m, n, k, 1.0,
       a.ctypes.data, la[1], b.ctypes.data, lb[1], beta, c.ctypes.data, lc[1])
