"""The NumPy backend: host arrays as the "device", kernels on the CPU through NumPy and BLAS.

Threads: the convolutions split their batch over `CNNC_NUM_THREADS` worker threads (default:
the CPUs this process may use), and constructing the backend makes NumPy's OpenBLAS
single-threaded, process-wide: OpenBLAS's own threads, woken for each of the convolutions'
many mid-sized gemms, ran them up to 10× slower on a two-core machine. An explicit
`OPENBLAS_NUM_THREADS` in the environment leaves OpenBLAS as it is. A pass over fewer images
than threads (inference at batch 1) splits each gemm over the C worker threads (`cgemm.py`),
or, where those are off, hands the threads to OpenBLAS for the pass. It also tunes glibc's
malloc to keep freed memory for reuse (`memory.py`; `CNNC_KEEP_MEMORY=0` turns that off).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from cnnc.backends.base import Backend
from cnnc.dsl.errors import CnncError

from . import blas, cgemm, memory, parallel, precision
from .kernels import ELEMENTWISE, KERNELS
from .losses import LOSSES


def _threads() -> int:
    """Worker threads for the kernels: CNNC_NUM_THREADS, else every CPU this process may use."""
    value = os.environ.get("CNNC_NUM_THREADS", "").strip()
    if not value:
        return parallel.available_cpus()
    if not value.isdigit() or int(value) < 1:
        raise CnncError(f"CNNC_NUM_THREADS must be a positive number, got `{value}`")
    return int(value)


class NumpyBackend(Backend):
    """Runs compiled plans with NumPy; arrays are float32 (integers stay integers)."""

    name = "numpy"
    kernels = KERNELS
    elementwise = ELEMENTWISE
    fused_ops = frozenset({"fused_conv", "fused_dense", "fused_bn", "fused_mul", "elemwise_chain", "layout_transform"})
    precisions = frozenset(precision.FORMATS)  # tf32, bf16 and fp16 emulated (precision.py)

    def precision_plan(self, plan, precision_name: str):
        self.check_precision(precision_name)
        return precision.precision_plan(plan, precision_name)

    def __init__(self) -> None:
        parallel.set_threads(_threads())
        if "OPENBLAS_NUM_THREADS" not in os.environ:
            blas.set_threads(1)  # the parallelism comes from splitting the batch
        if os.environ.get("CNNC_KEEP_MEMORY", "1").strip() != "0":
            memory.keep_freed_memory()

    def pass_scope(self, batch: int):
        # where the C workers split the gemms (cgemm.py) every kernel shares them, at any batch;
        # else a pass over fewer images than threads hands the threads to OpenBLAS
        if cgemm.available():
            return contextlib.nullcontext()
        return parallel.blas_threads_for(batch)

    def to_device(self, host) -> np.ndarray:
        a = np.asarray(host)
        if a.dtype.kind in "iub":  # labels and masks keep their type
            return np.ascontiguousarray(a)
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_host(self, a) -> np.ndarray:
        # a copy, as from a real device: callers may keep it while training goes on
        return np.array(a, copy=True)

    def zeros(self, shape, dtype="float32") -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def make_optimizer(config, params, lr_mult=None, decay_mult=None):
        """optim_rules' optimizer for config; the SGD family's update runs in C (coptim.py)."""
        from . import coptim
        return coptim.make_optimizer(config, params, lr_mult, decay_mult)

    def loss(self, name: str):
        try:
            return LOSSES[name]
        except KeyError:
            raise CnncError(f"backend `{self.name}` has no loss `{name}`",
                            hint="known losses: " + ", ".join(sorted(LOSSES))) from None
