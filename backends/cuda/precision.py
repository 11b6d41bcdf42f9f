"""Plans that compute in tf32, bf16 or fp16 on the CUDA backend (`train: precision=`).

`precision_plan(plan, precision)` rebinds every matmul-like step (op-table kinds `conv` and
`dense`, fused forms included), as the NumPy backend's emulation does (backends/numpy/
precision.py), and leaves the rest in float32 (BatchNorm and its statistics, softmax, the loss,
element-wise ops, the optimizer and its float32 master weights):

  - convolutions run `conv.kernels_in(precision)`: tiled ones their three passes on the tensor
    cores, which round the operands in registers as they load them (the output gradient on
    entry, before the bias and activation gradients read it, as here); depthwise ones conv_dw.cu
    on operands rounded first;
  - dense layers (cuBLAS) read operands rounded by `rounding.round_to` (kernels/round.cu): the
    input and the weight in forward, the output gradient and the weight in backward (the saved
    input is the rounded one), then compute in float32 on values the format holds, as the
    tensor cores do.

Storage stays float32 everywhere; what changes is the precision of the products' operands.
"""

from __future__ import annotations

from dataclasses import replace

from cnnc.backends.base import Kernel, Plan
from cnnc.compiler.ops import OPS

from . import conv, rounding
from .source import KernelSpec

MATMUL_KINDS = ("conv", "dense")  # op-table kinds whose kernels are matrix products


def _rounded_params(params: dict, precision: str) -> dict:
    return {k: rounding.round_to(v, precision) if k == "weight" else v for k, v in params.items()}


def rounding_kernel(kernel: Kernel, precision: str) -> Kernel:
    """`kernel` (a dense layer, plain or fused) reading its matmul operands rounded: the input and
    the weight in forward, the output gradient and the weight in backward."""

    def forward(node, xs, params, ctx):
        return kernel.forward(node, [rounding.round_to(xs[0], precision), *xs[1:]], _rounded_params(params, precision),
                              ctx)

    def backward(node, saved, dy, params, ctx):
        return kernel.backward(node, saved, rounding.round_to(dy, precision), _rounded_params(params, precision), ctx)

    return Kernel(forward, backward)


def step_kernel(step, precision: str) -> Kernel:
    """The kernel a matmul-like step runs in `precision`."""
    if OPS[step.node.op].kind == "conv":
        return conv.kernels_in(precision)[step.node.op]
    return rounding_kernel(step.kernel, precision)


def precision_plan(plan: Plan, precision: str) -> Plan:
    """The plan with its matmul-like steps computing in `precision` (fp32: the plan itself)."""
    if precision == "fp32":
        return plan
    steps = [replace(s, kernel=step_kernel(s, precision)) if OPS[s.node.op].kind in MATMUL_KINDS else s
             for s in plan.steps]
    return replace(plan, steps=steps)


def specs(node, training: bool, precision: str) -> list[KernelSpec]:
    """The kernels a matmul-like node runs in `precision`: a conv's (conv.specs), or a dense
    layer's rounding kernel (besides its float32 ones)."""
    if OPS[node.op].kind == "conv":
        return conv.specs(node, training, precision=precision)
    return [rounding.round_spec(precision)]
