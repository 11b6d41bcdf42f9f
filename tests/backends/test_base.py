"""The backend interface (backends/base.py): every backend answers make_optimizer, which the
training loop and `cnnc bench` call without probing for it; the interface's own is optim_rules'
rule, and the NumPy backend's runs the SGD family in C (the rule's step where no compiler works)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends import optim_rules
from cnnc.backends.base import Backend
from cnnc.backends.numpy import NumpyBackend, coptim
from cnnc.compiler.train_config import TrainConfig


def _params():
    return {"w": np.ones((3, 4), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}


@pytest.mark.parametrize("name,rule", [("momentum", optim_rules.SGD), ("adam", optim_rules.Adam),
                                       ("rmsprop", optim_rules.RMSprop)])
def test_the_interfaces_optimizer_is_the_rule(name, rule):
    opt = Backend.make_optimizer(TrainConfig(optimizer=name, lr=0.1), _params(), {"b": 2.0}, {"b": 0.0})
    assert type(opt) is rule and opt.lr_mult["b"] == 2.0 and opt.decay_mult["b"] == 0.0


def test_the_numpy_backend_runs_the_sgd_family_in_c_and_others_as_the_rule():
    be = NumpyBackend()
    sgd = be.make_optimizer(TrainConfig(optimizer="momentum", lr=0.1), _params())
    assert type(sgd) is coptim.CompiledSGD  # the rule's own step where the C kernels are off
    assert type(be.make_optimizer(TrainConfig(optimizer="adam", lr=0.1), _params())) is optim_rules.Adam
