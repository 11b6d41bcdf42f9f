"""Learning-rate schedules: Caffe's formulas by iteration, warm-up, plateau, and torch's schedulers."""

from __future__ import annotations

import math

import pytest

from cnnc.compiler.train_config import TrainConfig
from cnnc.runtime.schedules import make_schedule

SPE, EPOCHS = 7, 12  # steps per epoch, epochs
MAX_ITER = SPE * EPOCHS
ITERS = range(0, MAX_ITER + 10)  # a little past the end too


def _close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


# (config fields, the formula written out independently: iteration → lr)
FORMULAS = {
    "fixed": (dict(lr=0.1), lambda i: 0.1),
    "step": (dict(lr=0.1, gamma=0.5, step_size=3), lambda i: 0.1 * 0.5 ** math.floor(i / (3 * SPE))),
    "multistep": (dict(lr=0.1, gamma=0.2, milestones=(8, 2, 5)),
                  lambda i: 0.1 * 0.2 ** len([m for m in (2, 5, 8) if i >= m * SPE])),
    "exp": (dict(lr=0.1, gamma=0.97), lambda i: 0.1 * 0.97 ** i),
    "inv": (dict(lr=0.1, gamma=1e-3, power=0.75), lambda i: 0.1 * (1 + 1e-3 * i) ** -0.75),
    "poly": (dict(lr=0.1, power=2.0), lambda i: 0.1 * (1 - min(i, MAX_ITER) / MAX_ITER) ** 2),
    "sigmoid": (dict(lr=0.1, gamma=0.2, step_size=4),
                lambda i: 0.1 / (1 + math.exp(-0.2 * (i - 4 * SPE)))),
    "cosine": (dict(lr=0.1, min_lr=1e-3),
               lambda i: 1e-3 + (0.1 - 1e-3) * (1 + math.cos(math.pi * min(i, MAX_ITER) / MAX_ITER)) / 2),
}


@pytest.mark.parametrize("policy", list(FORMULAS))
def test_policy_formula(policy):
    fields, formula = FORMULAS[policy]
    s = make_schedule(TrainConfig(policy=policy, **fields), SPE, EPOCHS)
    for i in ITERS:
        got = s.lr(i)
        assert isinstance(got, float)
        assert _close(got, formula(i)), (policy, i, got, formula(i))


def test_step_and_multistep_count_epochs_in_iterations():
    s = make_schedule(TrainConfig(policy="step", lr=1.0, gamma=0.1, step_size=2), SPE, EPOCHS)
    assert s.lr(2 * SPE - 1) == 1.0 and _close(s.lr(2 * SPE), 0.1)
    m = make_schedule(TrainConfig(policy="multistep", lr=1.0, gamma=0.1, milestones=(3,)), SPE, EPOCHS)
    assert m.lr(3 * SPE - 1) == 1.0 and _close(m.lr(3 * SPE), 0.1)


def test_cosine_and_poly_end_values():
    c = make_schedule(TrainConfig(policy="cosine", lr=0.1, min_lr=1e-4), SPE, EPOCHS)
    assert c.lr(0) == 0.1
    assert _close(c.lr(MAX_ITER // 2), (0.1 + 1e-4) / 2)
    assert _close(c.lr(MAX_ITER), 1e-4) and _close(c.lr(MAX_ITER + 50), 1e-4)
    assert 1e-4 < c.lr(MAX_ITER - 1) < 1e-4 + 1e-4
    p = make_schedule(TrainConfig(policy="poly", lr=0.1, power=0.5), SPE, EPOCHS)
    assert p.lr(MAX_ITER) == 0.0 and p.lr(MAX_ITER + 1) == 0.0


def test_sigmoid_without_step_size_centres_on_the_middle():
    s = make_schedule(TrainConfig(policy="sigmoid", lr=0.1, gamma=0.5), SPE, EPOCHS)
    assert _close(s.lr(MAX_ITER // 2), 0.05)
    big = make_schedule(TrainConfig(policy="sigmoid", lr=0.1, gamma=50.0, step_size=100), SPE, 1000)
    assert big.lr(0) == 0.0  # exp(50·700) would overflow: no error, just 0
    assert big.lr(100_000) == 0.1


@pytest.mark.parametrize("policy", ["fixed", "step", "exp", "cosine", "plateau"])
def test_warmup_multiplies_any_policy(policy):
    fields = dict(FORMULAS.get(policy, (dict(lr=0.1),))[0])
    plain = make_schedule(TrainConfig(policy=policy, **fields), SPE, EPOCHS)
    warm = make_schedule(TrainConfig(policy=policy, warmup=2, **fields), SPE, EPOCHS)
    n = 2 * SPE
    for i in ITERS:
        factor = (i + 1) / n if i < n else 1.0
        assert _close(warm.lr(i), plain.lr(i) * factor), (i, warm.lr(i), plain.lr(i))
    assert _close(warm.lr(0), plain.lr(0) / n) and warm.lr(n) == plain.lr(n)


# ---- plateau ------------------------------------------------------------------------------------

def _plateau(**kw):
    return make_schedule(TrainConfig(policy="plateau", lr=0.1, **kw), SPE, EPOCHS)


def test_plateau_keeps_rate_while_improving():
    s = _plateau(patience=2)
    for loss in [1.0, 0.9, 0.8, 0.75, 0.7, 0.69]:
        s.end_epoch(loss)
        assert s.lr(0) == 0.1


def test_plateau_divides_by_ten_after_patience_bad_epochs():
    s = _plateau(patience=2)
    seen = []
    for loss in [1.0, 0.9, 0.95, 0.9,  # two epochs without a new best → ÷10
                 0.91, 0.8,  # one bad, then an improvement resets the count
                 0.85, 0.85, 0.85, 0.85]:  # four bad → two more reductions
        s.end_epoch(loss)
        seen.append(s.lr(123))
    expect = [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.0001]
    assert all(_close(a, b) for a, b in zip(seen, expect)), seen


def test_plateau_gamma_and_min_lr_floor():
    s = _plateau(patience=1, gamma=0.5, min_lr=0.02)
    s.end_epoch(1.0)
    rates = []
    for _ in range(5):
        s.end_epoch(2.0)
        rates.append(s.lr(0))
    assert rates == [0.05, 0.025, 0.02, 0.02, 0.02]
    nan = _plateau(patience=1)
    nan.end_epoch(1.0)
    nan.end_epoch(float("nan"))  # a diverged epoch is no improvement
    assert _close(nan.lr(0), 0.01)


def test_plateau_state_dict_round_trip():
    losses = [1.0, 0.9, 0.95, 0.97, 0.85, 0.9, 0.91, 0.92, 0.93]
    straight = _plateau(patience=2)
    for loss in losses:
        straight.end_epoch(loss)
    first = _plateau(patience=2)
    for loss in losses[:4]:
        first.end_epoch(loss)
    state = first.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    resumed = _plateau(patience=2)
    resumed.load_state_dict(dict(state))
    for loss in losses[4:]:
        resumed.end_epoch(loss)
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.lr(5) == straight.lr(5)


def test_other_policies_ignore_end_epoch():
    fields, formula = FORMULAS["step"]
    s = make_schedule(TrainConfig(policy="step", **fields), SPE, EPOCHS)
    for loss in [1.0, 2.0, 3.0, 4.0]:
        s.end_epoch(loss)
    assert all(_close(s.lr(i), formula(i)) for i in ITERS)


# ---- torch.optim.lr_scheduler ---------------------------------------------------------------------

def _torch_lrs(make, epochs: int, base: float = 0.1) -> list[float]:
    """The lr torch's scheduler gives after 0, 1, ..., epochs-1 calls to scheduler.step()."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make(torch.optim.lr_scheduler, opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_steplr_and_multisteplr_per_epoch():
    # torch steps these once per epoch; Caffe counts iterations, so every iteration of epoch e matches torch's e
    step = make_schedule(TrainConfig(policy="step", lr=0.1, gamma=0.3, step_size=3), SPE, EPOCHS)
    ref = _torch_lrs(lambda S, o: S.StepLR(o, step_size=3, gamma=0.3), EPOCHS)
    multi = make_schedule(TrainConfig(policy="multistep", lr=0.1, gamma=0.3, milestones=(2, 5, 9)), SPE, EPOCHS)
    ref_m = _torch_lrs(lambda S, o: S.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3), EPOCHS)
    for e in range(EPOCHS):
        for k in range(SPE):
            assert _close(step.lr(e * SPE + k), ref[e], 1e-9), (e, k)
            assert _close(multi.lr(e * SPE + k), ref_m[e], 1e-9), (e, k)


def test_per_iteration_policies_match_torch_stepped_each_iteration():
    # exp, cosine and poly change every iteration: torch's scheduler stepped once per iteration
    n = 60  # iterations = 1 step per epoch × 60 epochs
    cases = [
        (dict(policy="exp", gamma=0.95), lambda S, o: S.ExponentialLR(o, gamma=0.95)),
        (dict(policy="cosine", min_lr=0.002), lambda S, o: S.CosineAnnealingLR(o, T_max=n, eta_min=0.002)),
        (dict(policy="poly", power=1.5), lambda S, o: S.PolynomialLR(o, total_iters=n, power=1.5)),
        (dict(policy="poly", power=1.0), lambda S, o: S.PolynomialLR(o, total_iters=n, power=1.0)),
    ]
    for fields, make in cases:
        ours = make_schedule(TrainConfig(lr=0.1, **fields), 1, n)
        ref = _torch_lrs(make, n + 1)
        for i in range(n + 1):
            assert math.isclose(ours.lr(i), ref[i], rel_tol=1e-6, abs_tol=1e-12), (fields, i, ours.lr(i), ref[i])


def test_plateau_matches_reduce_lr_on_plateau():
    # eps=0: torch skips reductions smaller than its eps (1e-8); cnnc has no such cut-off
    torch = pytest.importorskip("torch")
    losses = [1.0, 0.9, 0.95, 0.93, 0.91, 0.85, 0.86, 0.86, 0.84, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    for patience, gamma, min_lr in [(1, 0.1, 0.0), (2, 0.1, 0.0), (3, 0.5, 0.03)]:
        ours = _plateau(patience=patience, gamma=gamma, min_lr=min_lr)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=gamma, patience=patience - 1,
                                                         threshold=0.0, min_lr=min_lr, eps=0.0)
        for loss in losses:
            ours.end_epoch(loss)
            ref.step(loss)
            assert _close(ours.lr(0), opt.param_groups[0]["lr"], 1e-12), (patience, loss)
