"""Float32 arrays rounded to tf32, bf16 or fp16 on the GPU (kernels/round.cu), kept as float32.

The precisions' codes (`CODES`) are the kernels' PREC / MMA macros: 1 tf32, 2 bf16, 3 fp16.
Rounding is to nearest, ties to even, as the NumPy backend's emulation (backends/numpy/precision.py).
"""

from __future__ import annotations

import numpy as np

from cnnc.dsl.errors import CnncError

from . import device
from .source import KernelSpec

CODES = {"tf32": 1, "bf16": 2, "fp16": 3}
THREADS = 256
MAX_BLOCKS = 4096  # a grid-stride loop: more blocks add nothing


def round_spec(precision: str) -> KernelSpec:
    return KernelSpec.make("round.cu", ("round_to",), PREC=CODES[precision])


def round_to(a, precision: str):
    """A new float32 device array: `a` rounded to `precision`."""
    if precision not in CODES:
        raise CnncError(f"round_to: no precision {precision!r}; one of {', '.join(CODES)}")
    cp = device.cupy()
    a = cp.ascontiguousarray(a, dtype=cp.float32)
    out = device.empty(a.shape)
    if a.size:
        blocks = max(1, min(MAX_BLOCKS, -(-a.size // THREADS)))
        fn = device.function(round_spec(precision), "round_to")
        fn((blocks, 1, 1), (THREADS, 1, 1), (a, out, np.int64(a.size)))
    return out
