"""Parameter initialisation: fans, the statistics of each initialiser, fixed values, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnc.compiler.ops import OPS, ParamSpec
from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import InternalError
from cnnc.runtime.init import fans, init_params

def _specs(op: str, in_shape, **attrs) -> list[ParamSpec]:
    """An op's ParamSpecs as the op table gives them (initialisers included)."""
    return OPS[op].params(OPS[op].attrs(**attrs), [in_shape])


# a small net's tensors, as compiler passes give them (keys are the runtime's, spec.name the op's)
SPECS = {f"{layer}.{s.name}": s for layer, specs in [
    ("conv1", _specs("conv", (3, 8, 8), filters=16, kernel=5)),
    ("gconv", _specs("conv", (16, 8, 8), filters=32, kernel=3, groups=4, bias=False)),  # C/groups in shape[1]
    ("bn", _specs("batchnorm", (32, 4, 4))),
    ("fc", _specs("dense", (800,), units=10)),
] for s in specs}
W = "weight"


def _init(specs=SPECS, seed=0, **config):
    return init_params(specs, TrainConfig(**config), np.random.default_rng(seed))


def test_fans_follow_pytorch():
    assert fans((16, 3, 5, 5)) == (3 * 25, 16 * 25)
    assert fans((32, 4, 3, 3)) == (4 * 9, 32 * 9)  # grouped conv: in-channels per group
    assert fans((10, 800)) == (800, 10)
    assert fans((8, 2, 1, 7)) == (14, 56)
    with pytest.raises(ValueError):
        fans((5,))


def test_fans_agree_with_torch():
    torch = pytest.importorskip("torch")
    for shape in [(16, 3, 5, 5), (32, 4, 3, 3), (10, 800), (8, 2, 1, 7)]:
        assert fans(shape) == torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


@pytest.mark.parametrize("init", ["xavier", "glorot", "he", "msra", "gaussian", "uniform", "constant"])
def test_shapes_dtypes_and_fixed_tensors(init):
    out = _init(init=init, init_value=0.25)
    assert out.keys() == SPECS.keys()
    for k, spec in SPECS.items():
        assert out[k].shape == spec.shape and out[k].dtype == np.float32, k
    for k in ("conv1.bias", "bn.bias", "fc.bias", "bn.running_mean"):
        assert not out[k].any(), k
    assert (out["bn.weight"] == 1).all() and (out["bn.running_var"] == 1).all()


# Large tensors, so the sample statistics sit well within a few % of the formula
BIG = {"conv": ParamSpec("weight", (256, 128, 3, 3), init=W), "gconv": ParamSpec("weight", (512, 8, 5, 5), init=W),
       "fc": ParamSpec("weight", (300, 2000), init=W)}


def _expected_std(init: str, shape, config: TrainConfig) -> float:
    fan_in, fan_out = fans(shape)
    return {"xavier": math.sqrt(2 / (fan_in + fan_out)),  # U(±a) has std a/√3, a = √(6/(in+out))
            "glorot": math.sqrt(2 / (fan_in + fan_out)),
            "he": math.sqrt(2 / fan_in), "msra": math.sqrt(2 / fan_in),
            "gaussian": config.init_std, "uniform": config.init_range / math.sqrt(3)}[init]


@pytest.mark.parametrize("init", ["xavier", "glorot", "he", "msra", "gaussian", "uniform"])
def test_statistics(init):
    config = TrainConfig(init=init, init_std=0.02, init_range=0.1)
    out = init_params(BIG, config, np.random.default_rng(1))
    for k, spec in BIG.items():
        w = out[k].astype(np.float64)
        std = _expected_std(init, spec.shape, config)
        assert abs(w.mean()) < 0.02 * std, (k, w.mean())
        assert abs(w.std() / std - 1) < 0.02, (k, w.std(), std)
        if init in ("xavier", "glorot", "uniform"):
            bound = std * math.sqrt(3)
            assert np.abs(w).max() <= bound * (1 + 1e-6)
            assert np.abs(w).max() > 0.99 * bound  # spans the whole interval
        else:  # normal: about 68% within one std, some beyond three
            assert abs(np.mean(np.abs(w) < std) - 0.6827) < 0.01
            assert np.abs(w).max() > 3 * std


def test_constant():
    out = _init(init="constant", init_value=-0.5)
    assert (out["conv1.weight"] == -0.5).all() and (out["fc.weight"] == -0.5).all()
    assert not out["fc.bias"].any() and (out["bn.weight"] == 1).all()  # the rule is for weights only


def test_he_uses_grouped_fan_in():
    out = init_params({"g": ParamSpec("weight", (512, 2, 3, 3), init=W), "d": ParamSpec("weight", (512, 64, 3, 3),
                                                                                        init=W)},
                      TrainConfig(init="he"), np.random.default_rng(0))
    assert abs(out["g"].std() / math.sqrt(2 / 18) - 1) < 0.03
    assert abs(out["d"].std() / math.sqrt(2 / 576) - 1) < 0.03


def test_seeding_is_deterministic():
    a, b, c = _init(seed=7), _init(seed=7), _init(seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in SPECS)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    first = init_params(SPECS, TrainConfig(init="xavier"), rng)
    rng.bit_generator.state = state
    again = init_params(SPECS, TrainConfig(init="xavier"), rng)
    assert all(np.array_equal(first[k], again[k]) for k in SPECS)


def test_the_table_says_how_each_tensor_starts():
    out = _init({"prelu.alpha": ParamSpec("alpha", (8,), init=0.25)})
    assert (out["prelu.alpha"] == 0.25).all()
    with pytest.raises(InternalError, match="unknown initialiser 'orthogonal'"):
        _init({"x.w": ParamSpec("w", (8, 8), init="orthogonal")})
