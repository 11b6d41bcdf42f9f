"""Optimizers for training: the update rules and what their state costs.

The rules (torch.optim's, and TensorFlow's FTRL, in numpy float32; `make_optimizer(config,
params)`, `state_dict()` / `load_state_dict`) are defined in backends/optim_rules.py, below the
backends, so that a backend's own optimizer (backends/cuda/optim.py) can follow them without
importing the runtime; they are importable from here as before. `state_arrays` counts the
optimizer's state for the runtime's memory estimates.
"""

from __future__ import annotations

from cnnc.backends.optim_rules import (DEFAULT_MOMENTUM, FTRL_INITIAL_ACCUMULATOR, SGD, Adadelta, Adagrad, Adam,
                                       AdamW, Ftrl, Optimizer, RMSprop, Rprop, make_optimizer)
from cnnc.compiler.train_config import TrainConfig

__all__ = ["DEFAULT_MOMENTUM", "FTRL_INITIAL_ACCUMULATOR", "SGD", "Adadelta", "Adagrad", "Adam", "AdamW", "Ftrl",
           "Optimizer", "RMSprop", "Rprop", "make_optimizer", "state_arrays"]


def state_arrays(config: TrainConfig) -> int:
    """How many parameter-sized arrays of state `config`'s optimizer keeps (for memory estimates)."""
    kind = config.optimizer
    if kind in ("sgd", "momentum", "nesterov"):
        return 0 if kind == "sgd" and config.momentum == 0 and not config.nesterov else 1
    if kind == "rmsprop":
        return 2 if config.momentum > 0 else 1
    return {"adagrad": 1, "adadelta": 2, "adam": 2, "adamw": 2, "ftrl": 2, "rprop": 2}[kind]
