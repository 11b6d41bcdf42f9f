"""The SGD family's update in C (backends/numpy/coptim.py) against optim_rules.SGD, to the bit.

sgd, momentum and nesterov, with and without weight decay, per-parameter learning-rate and decay
multipliers (a frozen layer among them), over several steps from the first (the momentum buffer
starts at the first gradient); the state dicts equal too. Where the C kernels are off the rule's
NumPy step runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends import optim_rules
from cnnc.backends.numpy import cc, coptim, parallel
from cnnc.compiler.train_config import TrainConfig

pytestmark = pytest.mark.skipif(not cc.available(), reason="no C compiler (cc) on this machine")

SHAPES = {"conv.weight": (16, 6, 5, 5), "conv.bias": (16,), "dense.weight": (84, 120), "frozen.weight": (7, 3)}


def _params(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("momentum", 0.9), ("nesterov", 0.8), ("sgd", 0.5)])
def test_compiled_sgd_equals_the_rule_to_the_bit(optimizer, momentum, weight_decay, threads, monkeypatch):
    monkeypatch.setenv("CNNC_JIT", "1")
    monkeypatch.setattr(parallel, "_threads", threads)
    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    config = TrainConfig(optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, lr=0.1, batch=8)
    lr_mult = {"conv.bias": 2.0, "frozen.weight": 0.0}
    decay_mult = {"conv.bias": 0.0, "dense.weight": 3.0}
    ref_p, fast_p = _params(1), _params(1)
    ref = optim_rules.make_optimizer(config, ref_p, lr_mult, decay_mult)
    fast = coptim.make_optimizer(config, fast_p, lr_mult, decay_mult)
    assert type(fast) is coptim.CompiledSGD and fast.name == ref.name
    rng = np.random.default_rng(2)
    for step in range(4):
        grads = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        lr = 0.1 / (step + 1)
        ref.step({k: v.copy() for k, v in grads.items()}, lr)
        fast.step(grads, lr)
        for k in SHAPES:
            np.testing.assert_array_equal(fast_p[k], ref_p[k], err_msg=f"{k} after step {step}")
    a, b = fast.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(fast_p["frozen.weight"], _params(1)["frozen.weight"])  # lr_mult 0


def test_the_rule_runs_where_the_c_kernels_are_off(monkeypatch):
    monkeypatch.setenv("CNNC_JIT", "0")
    config = TrainConfig(optimizer="momentum", momentum=0.9, weight_decay=1e-3, lr=0.1, batch=8)
    ref_p, fast_p = _params(3), _params(3)
    ref = optim_rules.make_optimizer(config, ref_p)
    fast = coptim.make_optimizer(config, fast_p)
    grads = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    ran = []
    monkeypatch.setattr(coptim, "_task", lambda: ran.append(1))
    ref.step(grads, 0.1)
    fast.step(grads, 0.1)
    assert not ran  # never asked for the C task
    for k in SHAPES:
        np.testing.assert_array_equal(fast_p[k], ref_p[k])


def test_other_optimizers_are_the_rules_own():
    config = TrainConfig(optimizer="adam", lr=1e-3, batch=8)
    assert type(coptim.make_optimizer(config, _params(0))) is optim_rules.Adam
