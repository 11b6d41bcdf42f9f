"""The learning-rate range test (runtime/lr_find.py): the smoothing and the divergence rule against
a direct computation on synthetic curves, the suggestion inside the sweep, and the model left as
it was found, bit for bit, weights, BatchNorm buffers, optimizer state and dropout generator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnc.dsl.errors import CnncError
from cnnc.runtime import api
from cnnc.runtime.lr_find import SKIP_START, RangeTest, lr_schedule, run_range_test

from conftest import make_data, tiny_net


def weighted_average(losses, beta):
    """The bias-corrected moving average written out: Σ β^(t−i)·x_i / Σ β^(t−i)."""
    out = []
    for t in range(len(losses)):
        w = beta ** np.arange(t, -1, -1, dtype=np.float64)
        out.append(float((w * np.asarray(losses[:t + 1])).sum() / w.sum()))
    return out


def synthetic(log_lr):
    """A loss that drops around lr 1e-3 (steepest at log10 lr = −3) and explodes past lr 1."""
    return 3 - 2 / (1 + np.exp(-4 * (log_lr + 3))) + np.exp(6 * log_lr)


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.98])
def test_smoothing_divergence_and_suggestion_on_a_synthetic_curve(beta):
    lrs = lr_schedule(1e-7, 10, 200)
    losses = synthetic(np.log10(lrs))
    test = RangeTest(beta=beta)
    stopped = next((i for i, (lr, loss) in enumerate(zip(lrs, losses)) if test.add(lr, loss)), None)
    expected = weighted_average(list(losses), beta)
    # the divergence, found independently: the first point whose average exceeds 4x the best before it
    diverge = next(i for i in range(1, len(expected)) if expected[i] > 4 * min(expected[:i]))
    assert stopped == diverge == test.diverged_at
    assert np.allclose(test.smoothed, expected[:diverge + 1], rtol=1e-12, atol=0)
    assert len(test.losses) == diverge + 1  # nothing recorded after the stop
    slope = np.gradient(np.asarray(expected[:diverge]), np.log10(lrs[:diverge]))
    steepest = SKIP_START + int(np.argmin(slope[SKIP_START:]))
    assert test.steepest() == steepest
    if beta == 0.0:  # no smoothing: the grid point nearest the curve's inflection, lr 1e-3
        assert abs(math.log10(lrs[steepest]) + 3) <= (8 / 199) / 2 + 1e-12
    assert lrs[0] <= lrs[steepest] < lrs[diverge]


def test_a_non_finite_loss_stops_at_once():
    test = RangeTest()
    assert not test.add(1e-3, 2.0)
    assert not test.add(1e-2, 1.9)
    assert test.add(1e-1, float("nan"))
    assert test.diverged_at == 2 and test.usable() == 2
    assert test.steepest() in (0, 1)  # with fewer than SKIP_START + 2 points, none is skipped


def test_schedule_is_exponential_and_bad_ranges_are_refused():
    lrs = lr_schedule(1e-7, 10, 100)
    assert lrs[0] == 1e-7 and math.isclose(lrs[-1], 10, rel_tol=1e-12)
    assert np.allclose(np.diff(np.log(lrs)), math.log(1e8) / 99)
    for start, end, steps in [(0, 1, 10), (1, 0.1, 10), (1e-3, 1, 1), (-1, 1, 10)]:
        with pytest.raises(CnncError, match="--st"):
            lr_schedule(start, end, steps)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lrfind")
    net = tmp / "tiny.cnn"
    # dropout draws from the generator the checkpoint carries: the test must put its state back too
    net.write_text(tiny_net().replace("gap -> dense", "gap -> dropout 0.2 -> dense"))
    data = make_data(tmp / "data.npz", n=64)
    run = tmp / "run"
    api.train(net, data=str(data), run_dir=run, progress=False, epochs=1)
    return net, data, run


def snapshot(trainer):
    return ({k: np.array(v) for k, v in trainer.model.host_params().items()},
            {k: np.array(v) for k, v in trainer.optimizer.state_dict().items()},
            trainer.dropout_rng.bit_generator.state)


def test_weights_buffers_and_optimizer_state_are_restored_bit_for_bit(trained_run):
    net, data, run = trained_run
    trainer, _ = api.prepare(resume=run, progress=False)  # momentum buffers and BatchNorm statistics set
    params, optim, rng = snapshot(trainer)
    step = trainer.step
    assert optim and any("running" in k or "mean" in k for k in params)
    result = run_range_test(trainer, 1e-4, 100, 40)
    assert trainer.step == step
    t = result.test
    # the weights did move during the test: the loss blew up far above anything the start weights give
    assert t.diverged_at is not None and max(t.smoothed[t.diverged_at], t.losses[t.diverged_at]) > 4 * min(t.smoothed)
    after_params, after_optim, after_rng = snapshot(trainer)
    assert params.keys() == after_params.keys() and optim.keys() == after_optim.keys()
    for k in params:
        assert params[k].tobytes() == after_params[k].tobytes(), k
    for k in optim:
        assert optim[k].tobytes() == after_optim[k].tobytes(), k
    assert rng == after_rng
    # the restored trainer goes on exactly as the run would have: the same next loss as a fresh resume
    again, _ = api.prepare(resume=run, progress=False)
    assert run_range_test(trainer, 1e-3, 1e-2, 2).test.losses == run_range_test(again, 1e-3, 1e-2, 2).test.losses


def test_suggestion_lies_inside_the_sweep_before_the_divergence(trained_run):
    net, data, _ = trained_run
    trainer, _ = api.prepare(net, data=str(data), progress=False)
    result = run_range_test(trainer, 1e-5, 10, 40)
    t = result.test
    assert len(t.lrs) == len(t.losses) == len(t.smoothed) <= 40
    assert np.allclose(t.lrs, lr_schedule(1e-5, 10, 40)[:len(t.lrs)], rtol=1e-12)
    s = t.steepest()
    assert s is not None and 1e-5 <= result.suggestion <= 10
    assert s < t.usable() and result.suggestion == t.lrs[s]
    assert result.min_loss_lr == t.lrs[int(np.argmin(t.smoothed[:t.usable()]))]


def test_fp16_steps_use_the_loss_scaler_and_its_state_is_restored(trained_run):
    net, data, _ = trained_run
    trainer, _ = api.prepare(net, data=str(data), progress=False, precision="fp16")
    assert trainer.scaler is not None
    params, optim, rng = snapshot(trainer)
    scale, step = trainer.scaler.state_dict(), trainer.step
    updates = []
    unscale = trainer.scaler.unscale

    def record(grads):  # the training loop's unscaling runs on every step of the test
        updates.append(len(grads))
        return unscale(grads)
    trainer.scaler.unscale = record
    result = run_range_test(trainer, 1e-4, 1, 12)
    assert len(updates) == len(result.test.losses) - (result.test.diverged_at is not None)
    assert trainer.scaler.state_dict() == scale and trainer.step == step
    after_params, after_optim, after_rng = snapshot(trainer)
    assert all(params[k].tobytes() == after_params[k].tobytes() for k in params)
    assert optim.keys() == after_optim.keys() and rng == after_rng
