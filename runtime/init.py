"""Parameter initialisation: `init_params(param_specs, config, rng)` → float32 arrays.

Weights (a "weight" with two or more dims) follow config.init, with PyTorch's fan convention:
fan_in = shape[1]·prod(shape[2:]), fan_out = shape[0]·prod(shape[2:]) (a grouped conv's
weight already has C/groups in shape[1]; a dense weight is (units, inputs)):

    xavier, glorot   U(−a, a),  a = sqrt(6 / (fan_in + fan_out))     (Glorot & Bengio 2010)
    he, msra         N(0, sqrt(2 / fan_in)²)   ("Xavier/2" in CS231n; He et al. 2015, fan-in mode)
    gaussian         N(0, init_std²)
    uniform          U(−init_range, init_range)
    constant         init_value

Every other tensor starts at the value its op-table `ParamSpec.init` gives (biases 0,
BatchNorm's scale and running variance 1, ...). Arrays are drawn from `rng` in the order of
`param_specs`, so the same generator state gives the same arrays.
"""

from __future__ import annotations

import math

import numpy as np

from cnnc.compiler.ops import ParamSpec
from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import InternalError

def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of `shape` (out, in, *kernel), as torch.nn.init computes them."""
    if len(shape) < 2:
        raise ValueError(f"fans need a weight with at least 2 dims, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def init_weight(shape: tuple[int, ...], config: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """One weight tensor (≥ 2 dims) initialised as config.init says."""
    fan_in, fan_out = fans(shape)
    kind = config.init
    if kind in ("xavier", "glorot"):
        a = math.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-a, a, size=shape)
    elif kind in ("he", "msra"):
        w = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    elif kind == "gaussian":
        w = rng.normal(0.0, config.init_std, size=shape)
    elif kind == "uniform":
        w = rng.uniform(-config.init_range, config.init_range, size=shape)
    elif kind == "constant":
        w = np.full(shape, config.init_value)
    else:
        raise ValueError(f"unknown initialiser `{kind}`")
    return w.astype(np.float32)


def init_params(param_specs: dict[str, ParamSpec], config: TrainConfig,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh float32 arrays for every spec (parameters and buffers), keyed as `param_specs` is:
    the op table's `ParamSpec.init` says which follow config.init and which start at a value."""
    out: dict[str, np.ndarray] = {}
    for key, spec in param_specs.items():
        shape = tuple(spec.shape)
        if spec.init == "weight":
            out[key] = init_weight(shape, config, rng)
        elif isinstance(spec.init, (int, float)):
            out[key] = np.full(shape, spec.init, dtype=np.float32)
        else:
            raise InternalError(f"`{key}`: the op table gives the unknown initialiser {spec.init!r}")
    return out
