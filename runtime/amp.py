"""Dynamic loss scaling for fp16 training, as PyTorch's `torch.amp.GradScaler`.

fp16's smallest subnormal is 2^-24, so small gradients would flush to zero in the backward
matmuls; the loss gradient is multiplied by a scale (initially 2^16) before backward, and
the parameter gradients divided by it before the optimizer step. A step whose gradients hold
an inf or NaN (the scale made something overflow fp16's 65504) is skipped and the scale halved;
after 2000 good steps in a row it doubles. The optimizer keeps float32 master weights and
state throughout. The scaler's state travels in the checkpoint (`AmpState`), so a resumed run
goes on with the same scale and counter, bit for bit.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt


class AmpState(BaseModel):
    """The loss scaler's state as a checkpoint stores it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    scale: Annotated[float, Field(gt=0)]
    growth_tracker: NonNegativeInt  # good steps in a row since the scale last changed
    skipped: NonNegativeInt = 0  # optimizer steps skipped for non-finite gradients, this run


class GradScaler:
    """torch.amp.GradScaler's arithmetic: a float32 scale, growth ×2 every 2000 good steps, backoff ×0.5."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = np.float32(init_scale)
        self.growth_factor = np.float32(growth_factor)
        self.backoff_factor = np.float32(backoff_factor)
        self.growth_interval = growth_interval
        self.growth_tracker = 0
        self.skipped = 0

    def scaled(self, dout):
        """The loss gradient times the scale: what backward starts from."""
        return dout * self.scale

    def unscale(self, grads: dict) -> tuple[dict, bool]:
        """(gradients divided by the scale, whether all of them are finite). As PyTorch, the
        division multiplies by the float32 reciprocal of the scale (computed in float64)."""
        finite = all(math.isfinite(float(g.sum(dtype=np.float64))) for g in grads.values())
        inv = np.float32(1.0 / float(self.scale))
        return {k: g * inv for k, g in grads.items()}, finite

    def update(self, finite: bool) -> None:
        """After a step: back off on an overflow, grow after `growth_interval` good steps in a row."""
        if not finite:
            self.scale = np.float32(self.scale * self.backoff_factor)
            self.growth_tracker = 0
            self.skipped += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = np.float32(self.scale * self.growth_factor)
            if np.isfinite(grown):  # PyTorch keeps the scale when growing would overflow float32
                self.scale = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return AmpState(scale=float(self.scale), growth_tracker=self.growth_tracker,
                        skipped=self.skipped).model_dump()

    def load_state_dict(self, state: AmpState | dict) -> None:
        state = state if isinstance(state, AmpState) else AmpState(**state)
        self.scale = np.float32(state.scale)
        self.growth_tracker, self.skipped = state.growth_tracker, state.skipped


def scaler_for(precision: str) -> GradScaler | None:
    """The loss scaler a precision needs: fp16's narrow exponent does; fp32, tf32 and bf16 do not."""
    return GradScaler() if precision == "fp16" else None
