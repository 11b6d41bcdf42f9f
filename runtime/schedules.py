"""Learning-rate schedules: Caffe's `lr_policy` formulas, counted in iterations, plus plateau and warm-up.

`make_schedule(config, steps_per_epoch, total_epochs)` returns a `Schedule`; `lr(iter)` gives the
rate for global iteration `iter` (0-based). The config gives `step_size` and `milestones` in
epochs; they become iterations here (× steps_per_epoch). With base_lr = config.lr,
max_iter = total_epochs·steps_per_epoch and stepsize = step_size·steps_per_epoch:

    fixed      base_lr
    step       base_lr · gamma^floor(iter / stepsize)
    multistep  base_lr · gamma^(number of milestones m with iter ≥ m)
    exp        base_lr · gamma^iter
    inv        base_lr · (1 + gamma·iter)^(−power)
    poly       base_lr · (1 − iter/max_iter)^power
    sigmoid    base_lr · 1 / (1 + exp(−gamma·(iter − stepsize)))
    cosine     min_lr + (base_lr − min_lr) · (1 + cos(π·iter/max_iter)) / 2
    plateau    base_lr · gamma^k, floored at min_lr, where k counts the reductions made by `end_epoch`

Because poly, cosine and sigmoid without a step_size are shaped by max_iter, a run using one
cannot be resumed with another number of epochs (`depends_on_length`): the epochs already
trained would have had other rates. `cnnc train --resume` refuses that, with the reason.

poly and cosine hold their end value past max_iter (iter is clamped), since (1 − iter/max_iter)
would turn negative. sigmoid without a step_size centres on max_iter/2.

plateau: `end_epoch(metric)` takes the epoch's validation loss (lower is better). A metric
below the best so far is an improvement; after `patience` epochs in a row without one the rate
is multiplied by gamma (default 0.1: "divide by 10 when validation accuracy stops improving",
the AlexNet/ResNet recipe), never going below min_lr, and the count starts again. This is
Keras's patience; torch.optim.lr_scheduler.ReduceLROnPlateau(patience=patience − 1,
threshold=0) behaves the same.

Warm-up (config.warmup epochs, warmup_iters = warmup·steps_per_epoch) multiplies any policy's
rate by (iter + 1)/warmup_iters while iter < warmup_iters; the policy itself still counts from
iteration 0.
"""

from __future__ import annotations

import math

from cnnc.compiler.train_config import TrainConfig


class Schedule:
    def __init__(self, config: TrainConfig, steps_per_epoch: int, total_epochs: int):
        if steps_per_epoch < 1 or total_epochs < 1:
            raise ValueError(f"a schedule needs steps_per_epoch ≥ 1 and total_epochs ≥ 1, "
                             f"got {steps_per_epoch} and {total_epochs}")
        self.policy = config.policy
        self.base_lr = float(config.lr)
        self.gamma = float(config.gamma)
        self.power = float(config.power)
        self.min_lr = float(config.min_lr)
        self.patience = int(config.patience)
        self.steps_per_epoch = int(steps_per_epoch)
        self.max_iter = int(total_epochs) * self.steps_per_epoch
        self.stepsize = (config.step_size * self.steps_per_epoch if config.step_size is not None
                         else self.max_iter / 2)  # only sigmoid may lack one (step requires it)
        self.milestones = sorted(m * self.steps_per_epoch for m in (config.milestones or ()))
        self.warmup_iters = int(config.warmup) * self.steps_per_epoch
        self._formula = getattr(self, "_" + self.policy)
        # epoch-level state; only plateau reads it
        self.epochs = 0
        self.plateau_lr = self.base_lr
        self.best = math.inf
        self.bad_epochs = 0

    def lr(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"iteration {step} < 0")
        rate = self._formula(step)
        if step < self.warmup_iters:
            rate *= (step + 1) / self.warmup_iters
        return float(rate)

    def end_epoch(self, metric: float) -> None:
        self.epochs += 1
        if self.policy != "plateau":
            return
        if metric < self.best:  # a NaN metric never improves
            self.best = float(metric)
            self.bad_epochs = 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.plateau_lr = max(self.plateau_lr * self.gamma, self.min_lr)
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"epochs": self.epochs, "plateau_lr": self.plateau_lr, "best": self.best,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict) -> None:
        self.epochs = int(d["epochs"])
        self.plateau_lr = float(d["plateau_lr"])
        self.best = float(d["best"])
        self.bad_epochs = int(d["bad_epochs"])

    # ---- the policies (iter → rate, before warm-up) -----------------------------------------

    def _fixed(self, it: int) -> float:
        return self.base_lr

    def _step(self, it: int) -> float:
        return self.base_lr * self.gamma ** (it // self.stepsize)

    def _multistep(self, it: int) -> float:
        return self.base_lr * self.gamma ** sum(it >= m for m in self.milestones)

    def _exp(self, it: int) -> float:
        return self.base_lr * self.gamma ** it

    def _inv(self, it: int) -> float:
        return self.base_lr * (1 + self.gamma * it) ** (-self.power)

    def _poly(self, it: int) -> float:
        return self.base_lr * (1 - min(it, self.max_iter) / self.max_iter) ** self.power

    def _sigmoid(self, it: int) -> float:
        x = -self.gamma * (it - self.stepsize)
        # 1/(1+e^x) without overflow for large x
        return self.base_lr / (1 + math.exp(x)) if x < 0 else self.base_lr * math.exp(-x) / (1 + math.exp(-x))

    def _cosine(self, it: int) -> float:
        t = min(it, self.max_iter) / self.max_iter
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2

    def _plateau(self, it: int) -> float:
        return self.plateau_lr


def depends_on_length(config: TrainConfig) -> bool:
    """Whether the rate at an iteration depends on the run's length (max_iter): poly, cosine, and
    sigmoid without a step_size. Such a run cannot be extended and stay equal to one run."""
    return config.policy in ("poly", "cosine") or (config.policy == "sigmoid" and config.step_size is None)


def make_schedule(config: TrainConfig, steps_per_epoch: int, total_epochs: int) -> Schedule:
    """The schedule `config.policy` names, for a run of `total_epochs` epochs of `steps_per_epoch` iterations."""
    return Schedule(config, steps_per_epoch, total_epochs)
