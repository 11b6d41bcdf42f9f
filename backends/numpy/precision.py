"""Reduced-precision arithmetic emulated on float32 arrays: what tensor cores see, computed on the CPU.

`round_to(x, precision)` rounds float32 values to the nearest value of a narrower format,
ties to even, by bit manipulation on the float32 representation (vectorised NumPy):

    tf32   10-bit mantissa, 8-bit exponent (float32's range)
    bf16    7-bit mantissa, 8-bit exponent (float32's range; float32 subnormals become bf16 ones)
    fp16   10-bit mantissa, 5-bit exponent: above 65504 (from 65520 on) overflows to inf, below
           2^-14 subnormals spaced 2^-24, below 2^-25 zero

NaN stays NaN, inf stays inf, a zero keeps its sign. The results are float32 arrays holding
exactly representable values of the narrow format, as `x.to(torch.bfloat16).float()` gives.

`precision_plan(plan, precision)` binds every matmul-like step (op-table kinds `conv` and
`dense`, fused forms included) to a kernel that rounds what the matmuls read: the input
activation and the weight in forward, the output gradient and the weight (and, through what
forward saved, the rounded input) in backward; the products accumulate in float32 and come
out in float32, as tensor cores accumulate. Everything else (BatchNorm and its statistics,
softmax, the loss, element-wise ops, the optimizer and its float32 master weights) is
untouched. Rounding on entry to each matmul rather than on exit of every op gives the same
values wherever the ops between two matmuls commute with rounding (ReLU, max pooling); it
differs from autocast's stored bf16 activations only where a float32 op (BatchNorm, a residual
add) reads a matmul's output before the next matmul does.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cnnc.backends.base import Kernel, Plan
from cnnc.compiler.ops import OPS

# precision → (mantissa bits, smallest normal exponent, largest finite value); None: float32's
FORMATS: dict[str, tuple[int, int, float] | None] = {
    "fp32": None,
    "tf32": (10, -126, float(np.finfo(np.float32).max)),  # rounded values above float32's max become inf
    "bf16": (7, -126, float(np.finfo(np.float32).max)),
    "fp16": (10, -14, 65504.0),
}
MATMUL_KINDS = ("conv", "dense")  # op-table kinds whose kernels are matrix products (tensor-core work)

_SIGN = np.uint32(0x8000_0000)
_ABS = np.uint32(0x7FFF_FFFF)
_INF = np.uint32(0x7F80_0000)


def _round_bits(bits: np.ndarray, drop: int) -> np.ndarray:
    """Round float32 bit patterns (magnitudes) to `drop` fewer mantissa bits, ties to even. A carry
    out of the mantissa steps the exponent up, as it should (and the largest values up to inf)."""
    half_minus_one = np.uint32((1 << (drop - 1)) - 1)
    odd = (bits >> np.uint32(drop)) & np.uint32(1)
    return (bits + half_minus_one + odd) & ~np.uint32((1 << drop) - 1)


def round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """x rounded to `precision` (fp32, tf32, bf16, fp16), as a new float32 array (fp32: x as float32)."""
    x = np.asarray(x, dtype=np.float32)
    fmt = FORMATS[precision]
    if fmt is None:
        return x
    mantissa, min_exp, largest = fmt
    bits = x.view(np.uint32)
    sign = bits & _SIGN
    mag = bits & _ABS
    rounded = _round_bits(mag, 23 - mantissa)
    if min_exp > -126:  # a narrower exponent: subnormals below 2^min_exp, inf above `largest`
        small = mag < np.float32(2.0 ** min_exp).view(np.uint32)
        rounded[small] = _subnormal_bits(mag[small], mantissa, min_exp)
        rounded = np.where(rounded > np.float32(largest).view(np.uint32), _INF, rounded)
    rounded = np.where(mag > _INF, mag | np.uint32(0x0040_0000), rounded)  # NaN stays (a quiet) NaN
    return (rounded | sign).view(np.float32)


def _subnormal_bits(mag: np.ndarray, mantissa: int, min_exp: int) -> np.ndarray:
    """Float32 magnitudes below 2^min_exp rounded to multiples of the format's smallest subnormal,
    2^(min_exp − mantissa), ties to even, as float32 bit patterns."""
    exp = (mag >> np.uint32(23)).astype(np.int64) - 127  # float32 subnormals (exp −127) are far below: they go to 0
    significand = (mag & np.uint32(0x7F_FFFF)).astype(np.int64) | (1 << 23)  # value = significand · 2^(exp − 23)
    # bits of the significand below the quantum 2^(min_exp − mantissa); 25 or more leave nothing but zero
    drop = np.clip((min_exp - mantissa) - (exp - 23), 1, 25)
    half = np.int64(1) << (drop - 1)
    odd = (significand >> drop) & 1
    units = (significand + half - 1 + odd) >> drop  # multiples of the quantum, 0 … 2^mantissa
    value = np.ldexp(units.astype(np.float32), min_exp - mantissa)  # exact: a value of the format
    return value.astype(np.float32).view(np.uint32)


# ---- kernels that compute in a precision -----------------------------------------------------

def _rounded_params(params: dict, precision: str) -> dict:
    return {k: round_to(v, precision) if k == "weight" else v for k, v in params.items()}


def matmul_kernel(kernel: Kernel, precision: str) -> Kernel:
    """`kernel` (a conv or dense, plain or fused) reading its matmul operands rounded to `precision`:
    the first input (a fused conv's residual, the second, is an addend, not an operand) and the
    weight in forward, the output gradient and the weight in backward."""

    def forward(node, xs, params, ctx):
        xs = [round_to(xs[0], precision), *xs[1:]]
        return kernel.forward(node, xs, _rounded_params(params, precision), ctx)

    def backward(node, saved, dy, params, ctx):
        return kernel.backward(node, saved, round_to(dy, precision), _rounded_params(params, precision), ctx)

    return Kernel(forward, backward)


def precision_plan(plan: Plan, precision: str) -> Plan:
    """The plan with its matmul-like steps computing in `precision` (fp32: the plan itself)."""
    if FORMATS[precision] is None:
        return plan
    steps = [replace(s, kernel=matmul_kernel(s.kernel, precision)) if OPS[s.node.op].kind in MATMUL_KINDS else s
             for s in plan.steps]
    return replace(plan, steps=steps)
