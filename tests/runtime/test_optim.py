"""The numpy optimizers against torch.optim (the oracle, test-only) and FTRL against its formula."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cnnc.compiler.train_config import TrainConfig
from cnnc.runtime.optim import DEFAULT_MOMENTUM, make_optimizer

torch = pytest.importorskip("torch")

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (5, 7), "bn.weight": (6,)}
STEPS = 20
SPARSE = "bn.weight"  # gets a gradient only on even steps: a param without a grad is left alone


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(STEPS):
        g = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}
        if t % 2:
            del g[SPARSE]
        out.append(g)
    return out


def _lrs(base: float) -> list[float]:
    # a varying rate, as a schedule gives: step() must use the lr it is handed
    return [base * (1 + 0.5 * np.sin(t)) for t in range(STEPS)]


# (config fields, torch class, torch kwargs); lr and weight_decay are added per case
CASES = {
    "sgd": (dict(optimizer="sgd"), "SGD", {}),
    "sgd+momentum": (dict(optimizer="sgd", momentum=0.8), "SGD", dict(momentum=0.8)),
    "momentum": (dict(optimizer="momentum"), "SGD", dict(momentum=0.9)),
    "nesterov": (dict(optimizer="nesterov", momentum=0.7), "SGD", dict(momentum=0.7, nesterov=True)),
    "adagrad": (dict(optimizer="adagrad", eps=1e-10), "Adagrad", dict(eps=1e-10)),
    "rmsprop": (dict(optimizer="rmsprop", rho=0.9, eps=1e-8), "RMSprop", dict(alpha=0.9, eps=1e-8)),
    "rmsprop+momentum": (dict(optimizer="rmsprop", rho=0.95, momentum=0.9), "RMSprop",
                         dict(alpha=0.95, eps=1e-8, momentum=0.9)),
    "adadelta": (dict(optimizer="adadelta", rho=0.9, eps=1e-6), "Adadelta", dict(rho=0.9, eps=1e-6)),
    "adam": (dict(optimizer="adam"), "Adam", dict(betas=(0.9, 0.999), eps=1e-8)),
    "adam-low-beta1": (dict(optimizer="adam", beta1=0.3, beta2=0.99), "Adam", dict(betas=(0.3, 0.99), eps=1e-8)),
    "adamw": (dict(optimizer="adamw"), "AdamW", dict(betas=(0.9, 0.999), eps=1e-8)),
}
BASE_LR = {"SGD": 0.05, "Adagrad": 0.1, "RMSprop": 0.01, "Adadelta": 1.0, "Adam": 0.01, "AdamW": 0.01}


def _torch_opt(cls: str, tparams: dict, kwargs: dict, lr: float, wd: float, lr_mult=None, decay_mult=None):
    groups = [{"params": [p], "lr": lr * (lr_mult or {}).get(k, 1.0),
               "weight_decay": wd * (decay_mult or {}).get(k, 1.0)} for k, p in tparams.items()]
    return getattr(torch.optim, cls)(groups, foreach=False, **kwargs)


def _compare(fields: dict, cls: str, kwargs: dict, wd: float, lr_mult=None, decay_mult=None, tol=1e-6):
    base = BASE_LR[cls]
    config = TrainConfig(lr=base, weight_decay=wd, **fields)
    params = _params()
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = make_optimizer(config, params, lr_mult, decay_mult)
    topt = _torch_opt(cls, tparams, kwargs, base, wd, lr_mult, decay_mult)
    for t, (g, lr) in enumerate(zip(_grads(), _lrs(base))):
        opt.step(g, lr)
        for k, p in tparams.items():
            p.grad = torch.from_numpy(g[k].copy()) if k in g else None
        for group, k in zip(topt.param_groups, tparams):
            group["lr"] = lr * (lr_mult or {}).get(k, 1.0)
        topt.step()
        for k, p in tparams.items():
            assert params[k].dtype == np.float32
            diff = np.abs(params[k] - p.detach().numpy()).max()
            assert diff <= tol, f"step {t}, {k}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("wd", [0.0, 0.05], ids=["nodecay", "decay"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, wd):
    fields, cls, kwargs = CASES[case]
    _compare(fields, cls, kwargs, wd)


@pytest.mark.parametrize("case", ["sgd+momentum", "adam", "adamw", "rmsprop"])
def test_lr_and_decay_multipliers_match_torch_param_groups(case):
    fields, cls, kwargs = CASES[case]
    lr_mult = {"conv.weight": 1.0, "conv.bias": 2.0, "fc.weight": 0.5, "bn.weight": 0.0}  # bn frozen
    decay_mult = {"conv.weight": 1.0, "conv.bias": 0.0, "fc.weight": 3.0}
    _compare(fields, cls, kwargs, 0.05, lr_mult, decay_mult)


def test_zero_lr_mult_freezes():
    params = _params()
    before = params["fc.weight"].copy()
    # multipliers may also name tensors the optimizer does not own (buffers, frozen layers)
    opt = make_optimizer(TrainConfig(optimizer="adam", lr=0.1), params,
                         lr_mult={"fc.weight": 0.0, "bn.running_mean": 1.0}, decay_mult={"bn.running_var": 1.0})
    for g in _grads()[:3]:
        opt.step(g, 0.1)
    assert np.array_equal(params["fc.weight"], before)
    assert not np.array_equal(params["conv.weight"], _params()["conv.weight"])


def test_updates_in_place():
    params = _params()
    refs = dict(params)
    opt = make_optimizer(TrainConfig(optimizer="nesterov"), params)
    for g in _grads()[:2]:
        opt.step(g, 0.1)
    assert all(params[k] is refs[k] for k in params)
    assert not np.array_equal(refs["fc.weight"], _params()["fc.weight"])


def test_momentum_rule():
    for name, given, expect in [("momentum", 0.0, DEFAULT_MOMENTUM), ("nesterov", 0.0, DEFAULT_MOMENTUM),
                                ("momentum", 0.5, 0.5), ("sgd", 0.0, 0.0), ("sgd", 0.6, 0.6)]:
        opt = make_optimizer(TrainConfig(optimizer=name, momentum=given), _params())
        assert opt.momentum == expect, name
    assert make_optimizer(TrainConfig(optimizer="nesterov"), _params()).nesterov
    assert make_optimizer(TrainConfig(optimizer="sgd", momentum=0.9, nesterov=True), _params()).nesterov


# ---- FTRL ---------------------------------------------------------------------------------------

def _ftrl_reference(w0: dict, grads: list, lrs: list, lr_power, l1, l2, wd=0.0):
    """Straight from the per-coordinate formula, in float64."""
    w = {k: v.astype(np.float64).ravel().tolist() for k, v in w0.items()}
    n = {k: [0.1] * len(v) for k, v in w.items()}
    z = {k: [0.0] * len(v) for k, v in w.items()}
    history = []
    for g_t, lr in zip(grads, lrs):
        for k, g_arr in g_t.items():
            gs = g_arr.astype(np.float64).ravel().tolist()
            for i, g in enumerate(gs):
                g = g + wd * w[k][i]
                n_new = n[k][i] + g * g
                sigma = (n_new ** -lr_power - n[k][i] ** -lr_power) / lr
                z[k][i] += g - sigma * w[k][i]
                n[k][i] = n_new
                if abs(z[k][i]) > l1:
                    sign = 1.0 if z[k][i] > 0 else -1.0
                    w[k][i] = (sign * l1 - z[k][i]) / (n_new ** -lr_power / lr + 2 * l2)
                else:
                    w[k][i] = 0.0
        history.append({k: np.array(v).reshape(w0[k].shape) for k, v in w.items()})
    return history


@pytest.mark.parametrize("lr_power,l1,l2,wd", [(-0.5, 0.0, 0.0, 0.0), (-0.5, 0.05, 0.1, 0.0),
                                               (-0.3, 0.02, 0.5, 0.01), (0.0, 0.01, 0.0, 0.0)])
def test_ftrl_matches_formula(lr_power, l1, l2, wd):
    config = TrainConfig(optimizer="ftrl", lr=0.1, lr_power=lr_power, l1=l1, l2=l2, weight_decay=wd)
    params = _params()
    w0 = {k: v.copy() for k, v in params.items()}
    grads, lrs = _grads(), _lrs(0.1)
    expected = _ftrl_reference(w0, grads, lrs, lr_power, l1, l2, wd)
    opt = make_optimizer(config, params)
    zeros = 0
    for t, (g, lr) in enumerate(zip(grads, lrs)):
        opt.step(g, lr)
        for k in params:
            # atol: w = −z/q cancels in z, so a weight near 0 carries the float32 rounding of O(1) terms
            np.testing.assert_allclose(params[k], expected[t][k], rtol=1e-5, atol=1e-6, err_msg=f"step {t} {k}")
            zeros += int((params[k] == 0).sum())
    if l1 >= 0.05:
        assert zeros > 0  # the L1 term makes weights exactly sparse


# ---- checkpoints --------------------------------------------------------------------------------

ALL = list(CASES) + ["ftrl"]


def _config(case: str) -> TrainConfig:
    if case == "ftrl":
        return TrainConfig(optimizer="ftrl", lr=0.1, l1=0.01, l2=0.01, weight_decay=0.01)
    fields, cls, _ = CASES[case]
    return TrainConfig(lr=BASE_LR[cls], weight_decay=0.01, **fields)


def _npz_roundtrip(d: dict) -> dict:
    buf = io.BytesIO()
    np.savez(buf, **d)
    buf.seek(0)
    with np.load(buf) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("case", ALL)
def test_state_dict_resumes_bit_for_bit(case):
    config, grads = _config(case), _grads()
    lrs = _lrs(config.lr)
    straight = _params()
    opt = make_optimizer(config, straight)
    for g, lr in zip(grads, lrs):
        opt.step(g, lr)

    first = _params()
    opt1 = make_optimizer(config, first)
    for g, lr in zip(grads[:10], lrs[:10]):
        opt1.step(g, lr)
    state = opt1.state_dict()
    assert (state or case == "sgd") and all(isinstance(v, np.ndarray) for v in state.values())
    assert all(v.shape == () for k, v in state.items() if k.startswith("step/"))
    state = _npz_roundtrip(state)  # as a checkpoint file would carry it
    resumed = {k: v.copy() for k, v in first.items()}
    opt2 = make_optimizer(config, resumed)
    opt2.load_state_dict(state)
    for g, lr in zip(grads[10:], lrs[10:]):
        opt2.step(g, lr)
    for k in straight:
        assert np.array_equal(resumed[k], straight[k]), k
    # the saved state is a snapshot: stepping on does not change it
    snap = opt1.state_dict()
    kept = {k: v.copy() for k, v in snap.items()}
    opt1.step(grads[10], lrs[10])
    assert all(np.array_equal(snap[k], kept[k]) for k in kept)


def test_state_dict_keys_and_errors():
    params = _params()
    opt = make_optimizer(TrainConfig(optimizer="momentum"), params)
    assert opt.state_dict() == {}
    opt.step(_grads()[0], 0.1)
    assert set(opt.state_dict()) == {f"momentum_buffer/{k}" for k in SHAPES}
    with pytest.raises(KeyError):
        opt.load_state_dict({"exp_avg/fc.weight": np.zeros((5, 7), np.float32)})
    with pytest.raises(KeyError):
        opt.load_state_dict({"momentum_buffer/nope": np.zeros(3, np.float32)})
    with pytest.raises(ValueError):
        opt.load_state_dict({"momentum_buffer/fc.weight": np.zeros((7, 5), np.float32)})
    with pytest.raises(KeyError):
        opt.step({"nope": np.zeros(3, np.float32)}, 0.1)
    with pytest.raises(TypeError):
        make_optimizer(TrainConfig(), {"w": np.zeros(3)})  # float64: the runtime holds float32


def test_ftrl_rejects_positive_lr_power():
    with pytest.raises(ValueError, match="lr_power"):
        make_optimizer(TrainConfig(optimizer="ftrl", lr_power=0.5), _params())


def test_the_runtime_trains_with_the_rules_the_backends_hold():
    from cnnc.backends import optim_rules
    from cnnc.runtime import optim

    for name in ("Optimizer", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Ftrl", "make_optimizer",
                 "DEFAULT_MOMENTUM"):
        assert getattr(optim, name) is getattr(optim_rules, name), name
    opt = make_optimizer(TrainConfig(optimizer="adamw"), _params())
    assert isinstance(opt, optim_rules.Adam) and opt.decoupled_decay


# ---- Rprop --------------------------------------------------------------------------------------

def _rprop_grads(steps: int, seed: int = 2) -> list[dict[str, np.ndarray]]:
    """Half of each tensor keeps its sign from step to step (its steps grow to the largest), half
    flips at random (they shrink, and skip a move after each flip); some exact zeros; SPARSE gets
    a gradient on even steps only."""
    rng = np.random.default_rng(seed)
    steady = {k: rng.choice([-1.0, 1.0], s) for k, s in SHAPES.items()}
    out = []
    for t in range(steps):
        g = {}
        for k, s in SHAPES.items():
            noise = rng.normal(0, 1, s)
            v = np.where(np.arange(np.prod(s)).reshape(s) % 2 == 0, steady[k] * np.abs(noise), noise)
            v[rng.random(s) < 0.05] = 0.0
            g[k] = v.astype(np.float32)
        if t % 2:
            del g[SPARSE]
        out.append(g)
    return out


@pytest.mark.parametrize("fields, kwargs, wd", [
    (dict(), dict(), 0.0),  # torch's defaults: etas (0.5, 1.2), step sizes (1e-6, 50)
    (dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.05)), dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.05)), 0.0),
    (dict(step_sizes=(5e-3, 1.0)), dict(step_sizes=(5e-3, 1.0)), 0.05),  # L2 decay: added to torch's gradient
], ids=["defaults", "etas-and-clamps", "decay"])
def test_rprop_equals_torch_step_for_step(fields, kwargs, wd):
    """50 steps, bit for bit: torch.optim.Rprop (single-tensor code) is the oracle. The learning rate
    sets only the first step size, so a schedule's later rates must not matter (varying lr given)."""
    steps, base = 50, 0.01
    config = TrainConfig(optimizer="rprop", lr=base, weight_decay=wd, **fields)
    params = _params()
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = make_optimizer(config, params)
    topt = torch.optim.Rprop(list(tparams.values()), lr=base, foreach=False, **kwargs)
    lows = highs = 0
    for t, g in enumerate(_rprop_grads(steps)):
        opt.step(g, base * (1 + 0.5 * np.sin(t)) if t else base)
        for k, p in tparams.items():
            grad = torch.from_numpy(g[k].copy()) if k in g else None
            p.grad = grad + wd * p.detach() if grad is not None and wd else grad
        topt.step()
        for k, p in tparams.items():
            assert np.array_equal(params[k], p.detach().numpy()), f"step {t}, {k}"
    for k, p in tparams.items():
        ours, theirs = opt.state["step_size"][k], topt.state[p]["step_size"].numpy()
        assert np.array_equal(ours, theirs) and np.array_equal(opt.state["prev"][k], topt.state[p]["prev"].numpy())
        lo, hi = kwargs.get("step_sizes", (1e-6, 50))
        lows += int((ours == np.float32(lo)).sum())
        highs += int((ours == np.float32(hi)).sum())
    if fields:  # the clamps were reached at both ends, so they are tested too
        assert lows and highs, (lows, highs)


def test_rprop_state_round_trip_and_checks():
    config = TrainConfig(optimizer="rprop", lr=0.02)
    grads = _rprop_grads(6)
    a, b = _params(), _params()
    opt_a = make_optimizer(config, a)
    for g in grads:
        opt_a.step(g, 0.02)
    opt_b = make_optimizer(config, b)
    for g in grads[:3]:
        opt_b.step(g, 0.02)
    resumed = make_optimizer(config, b)
    resumed.load_state_dict(opt_b.state_dict())
    for g in grads[3:]:
        resumed.step(g, 0.02)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted({k.split("/")[0] for k in opt_a.state_dict()}) == ["prev", "step", "step_size"]
    with pytest.raises(ValueError, match="etaminus"):
        from cnnc.runtime.optim import Rprop
        Rprop(_params(), etas=(1.5, 2.0))
