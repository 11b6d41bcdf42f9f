"""Batch-split parallelism for the heavy kernels: a few worker threads, each on a slice of the batch.

NumPy drops the GIL inside matmul, copies and large ufunc loops, so threads that each run a
kernel on their own rows of the batch use all cores. That beats OpenBLAS's own threading for
the convolutions' many mid-sized gemms (one join per kernel instead of one per gemm), which is
why the backend sets OpenBLAS to one thread. Small work runs inline: threads cost ~50 µs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from concurrent.futures import ThreadPoolExecutor

from . import blas

MIN_WORK = 4_000_000  # multiply-adds below which a kernel runs unsplit

_threads = 1
_blas_scope = False  # inside `blas_threads_for`: our kernels run unsplit, BLAS uses the threads
_pool: ThreadPoolExecutor | None = None


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    """The CPU's model name and feature flags, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine() or "?", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
        flags = frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        pass
    return name, flags


def cpu_flags() -> frozenset:
    """The CPU's feature flags ("avx2", "avx512f", ...); empty where the system does not say."""
    return _cpuinfo()[1]


def cpu_model() -> str:
    """The CPU's model name and widest vector unit ("AMD EPYC (AVX-512)"): one model name covers
    several generations, and the vector width decides which BLAS kernels run."""
    name, flags = _cpuinfo()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2" if flags else "?"
    return f"{name} ({simd})"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    """Use up to `n` worker threads (1: everything inline)."""
    global _threads, _pool
    n = max(int(n), 1)
    if n != _threads and _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    _threads = n


def get_threads() -> int:
    """The threads the kernels split their work over (1 inside `blas_threads_for`)."""
    return 1 if _blas_scope else _threads


@contextlib.contextmanager
def blas_threads_for(batch: int):
    """Around one pass over a batch of fewer images than threads (inference at batch 1): the
    threads go to BLAS (OpenBLAS's own, which split each gemm's pixels and share its packed
    weights) and the backend's kernels run unsplit. Measured on 2 cores of an AVX-512 Xeon, batch
    1, ms: MobileNetV2 17.6 → 11.6-12.4, EfficientNet-B0 36.9 → 27.8-29.6, ResNet-50 70.6 →
    61.7-62.6. Our kernels split the filters there, giving OpenBLAS gemms of half the rows, which
    it runs at half its speed, and each split waits ~90 µs for the worker thread on that machine.
    A no-op where BLAS's thread count cannot be set, for batches of at least as many images as
    threads, and when nested."""
    global _blas_scope
    if _blas_scope or batch >= _threads or blas.get_threads() is None:
        yield
        return
    _blas_scope = True
    try:
        with blas.threads(_threads):
            yield
    finally:
        _blas_scope = False


def chunks(n: int, work: float, minimum: float | None = None) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slices of a batch of n, one per thread, or one slice for work under
    `minimum` (default MIN_WORK)."""
    parts = min(get_threads(), n) if work >= (MIN_WORK if minimum is None else minimum) else 1
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def run(fn, slices: list[tuple[int, int]]) -> list:
    """fn(lo, hi) for every slice, in parallel when there are several; results in order."""
    global _pool
    if len(slices) == 1:
        return [fn(*slices[0])]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(_threads - 1, 1), thread_name_prefix="cnnc-numpy")
    futures = [_pool.submit(fn, lo, hi) for lo, hi in slices[1:]]
    first = fn(*slices[0])  # the calling thread takes a share too
    return [first] + [f.result() for f in futures]


# elements per block of element-wise work (float32: 1 MiB an array): a block and its temporaries stay
# in the cache between ops; much smaller ones lose more to NumPy's per-call overhead (~3 µs) than they gain
BLOCK = 1 << 18
WORK_PER_ELEMENT = 8  # chunks' work units per element-wise element: threads from ~512K elements


def ranges(size: int, fn, unit: int = 1, block: int | None = None) -> None:
    """fn(a, b) over [0, size) in blocks of about `block` (default BLOCK) elements (multiples of
    `unit`), the blocks split over the worker threads."""
    units = size // unit
    step = max(1, (block or BLOCK) // unit)

    def part(lo, hi):
        for i in range(lo, hi, step):
            fn(i * unit, min(i + step, hi) * unit)

    if units:
        run(part, chunks(units, WORK_PER_ELEMENT * size))
