"""Optimizers on the GPU: one fused update kernel per rule (`kernels/optim.cu`).

`make_optimizer(config, params, lr_mult, decay_mult)` has `backends.optim_rules.make_optimizer`'s
signature and meaning (the CUDA backend offers it as `make_optimizer`, which the trainer
prefers): it builds the NumPy rule's optimizer over the same device arrays only to resolve the
configuration (defaults, checks, per-parameter multipliers) and wraps it in a `CudaOptimizer`,
whose `step(grads, lr)` launches one kernel per parameter with the rule's scalars cast to float32
exactly as NumPy casts them in backends/optim_rules.py, so the updates match NumPy's bit for bit
(FTRL's powers within an ulp). `state_dict()` returns host NumPy arrays under the NumPy rules' keys
("<state>/<param>"; step counters are 0-d int64 arrays) and `load_state_dict` takes them back,
so checkpoints move between the backends.
"""

from __future__ import annotations

import numpy as np

from .. import optim_rules as host_optim
from . import device
from .source import KernelSpec

THREADS = 256
MAX_BLOCKS = 4096
ENTRIES = ("sgd_step", "adagrad_step", "rmsprop_step", "adadelta_step", "adam_step", "ftrl_step", "rprop_step")
_SPEC = KernelSpec.make("optim.cu", ENTRIES)


def specs() -> list[KernelSpec]:
    return [_SPEC]


def _f(v) -> np.float32:
    return np.float32(v)


class CudaOptimizer:
    """The update rule of a NumPy optimizer (`rule`, backends/optim_rules.py), run on device arrays."""

    def __init__(self, rule: host_optim.Optimizer):
        self.rule = rule
        self.name = rule.name
        self.STATE = rule.STATE
        self.params = rule.params
        self.lr_mult, self.decay_mult, self.weight_decay = rule.lr_mult, rule.decay_mult, rule.weight_decay
        self.state: dict[str, dict] = {kind: {} for kind in self.STATE}
        self._fns: dict[str, object] = {}

    # ---- the update --------------------------------------------------------------------------

    def step(self, grads: dict, lr: float) -> None:
        cp = device.cupy()
        for name, g in grads.items():
            if name not in self.params:
                raise KeyError(f"gradient for unknown parameter `{name}`")
            p = self.params[name]
            if p.dtype != np.float32 or not p.flags.c_contiguous:
                raise TypeError(f"parameter `{name}` must be a C-contiguous float32 device array")
            g = cp.ascontiguousarray(cp.asarray(g), dtype=cp.float32)
            if g.shape != p.shape:
                raise ValueError(f"gradient for `{name}` has shape {g.shape}, parameter {p.shape}")
            eta = float(lr) * self.lr_mult[name]
            if eta == 0.0:
                continue
            wd = self.weight_decay * self.decay_mult[name]
            self._update(name, p, g, eta, wd)

    def _launch(self, entry: str, n: int, *args) -> None:
        fn = self._fns.get(entry)
        if fn is None:
            fn = self._fns[entry] = device.function(_SPEC, entry)
        blocks = max(1, min(MAX_BLOCKS, -(-n // THREADS)))
        fn((blocks,), (THREADS,), args)

    def _buf(self, kind: str, name: str, fill: float = 0.0):
        bufs = self.state[kind]
        if name not in bufs:
            cp = device.cupy()
            bufs[name] = cp.full(self.params[name].shape, fill, dtype=cp.float32)
        return bufs[name]

    def _count(self, name: str) -> int:
        steps = self.state["step"]
        steps[name] = np.asarray(int(steps.get(name, 0)) + 1, dtype=np.int64)
        return int(steps[name])

    def _update(self, name: str, p, g, eta: float, wd: float) -> None:
        r = self.rule
        n = np.int64(p.size)
        l2 = _f(0.0 if r.decoupled_decay else wd)  # L2 decay joins the gradient; AdamW's goes to the weights
        neg_lr = _f(-eta)
        if isinstance(r, host_optim.SGD):
            m = r.momentum
            buf, first = p, 0
            if m != 0:
                bufs = self.state["momentum_buffer"]
                first = int(name not in bufs)
                if first:  # torch starts the buffer at the first gradient: the kernel writes all of it
                    bufs[name] = device.empty(p.shape)
                buf = bufs[name]
            self._launch("sgd_step", p.size, p, g, buf, n, l2, neg_lr, _f(m), np.int32(r.nesterov), np.int32(first))
        elif isinstance(r, host_optim.Adagrad):
            self._count(name)
            s = self._buf("sum", name)
            self._launch("adagrad_step", p.size, p, g, s, n, l2, neg_lr, _f(r.eps))
        elif isinstance(r, host_optim.RMSprop):
            self._count(name)
            v = self._buf("square_avg", name)
            buf = self._buf("momentum_buffer", name) if r.momentum > 0 else p  # torch starts this one at zero
            self._launch("rmsprop_step", p.size, p, g, v, buf, n, l2, neg_lr, _f(r.alpha), _f(1 - r.alpha), _f(r.eps),
                         _f(r.momentum))
        elif isinstance(r, host_optim.Adadelta):
            self._count(name)
            v = self._buf("square_avg", name)
            u = self._buf("acc_delta", name)
            self._launch("adadelta_step", p.size, p, g, v, u, n, l2, neg_lr, _f(r.rho), _f(1 - r.rho), _f(r.eps))
        elif isinstance(r, host_optim.Adam):  # AdamW too
            t = self._count(name)
            decay = _f(1 - eta * wd) if (r.decoupled_decay and wd != 0) else _f(1.0)
            m = self._buf("exp_avg", name)
            v = self._buf("exp_avg_sq", name)
            step_size = eta / (1 - r.beta1 ** t)
            bc2_sqrt = (1 - r.beta2 ** t) ** 0.5
            self._launch("adam_step", p.size, p, g, m, v, n, l2, decay, _f(1 - r.beta1), _f(r.beta2), _f(1 - r.beta2),
                         _f(bc2_sqrt), _f(r.eps), _f(-step_size))
        elif isinstance(r, host_optim.Rprop):
            self._count(name)
            prev = self._buf("prev", name)
            step = self._buf("step_size", name, eta)  # torch: full_like(grad, lr) on the first step
            self._launch("rprop_step", p.size, p, g, prev, step, n, l2, _f(r.etaminus), _f(r.etaplus),
                         _f(r.step_min), _f(r.step_max))
        elif isinstance(r, host_optim.Ftrl):
            self._count(name)
            acc = self._buf("accumulator", name, r.initial_accumulator)
            lin = self._buf("linear", name)
            self._launch("ftrl_step", p.size, p, g, acc, lin, n, l2, _f(eta), _f(-r.lr_power), _f(r.l1),
                         _f(2 * r.l2))
        else:
            raise ValueError(f"no CUDA kernel for the optimizer `{r.name}`")

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        cp = device.cupy()
        out = {}
        for kind, bufs in self.state.items():
            for name, arr in bufs.items():
                out[f"{kind}/{name}"] = arr.copy() if isinstance(arr, np.ndarray) else cp.asnumpy(arr)
        return out

    def load_state_dict(self, d: dict) -> None:
        cp = device.cupy()
        state: dict[str, dict] = {kind: {} for kind in self.STATE}
        for key, value in d.items():
            kind, _, name = key.partition("/")
            if kind not in state:
                keeps = ", ".join(self.STATE) or "none"
                raise KeyError(f"`{key}`: {self.name} keeps no state `{kind}` (it keeps {keeps})")
            if name not in self.params:
                raise KeyError(f"`{key}`: no parameter `{name}`")
            arr = np.array(cp.asnumpy(value) if not isinstance(value, np.ndarray) and hasattr(value, "device")
                           else value)  # a copy: the checkpoint's arrays stay the caller's
            if kind == "step":
                if arr.shape != ():
                    raise ValueError(f"`{key}`: a step counter is a 0-d array, got shape {arr.shape}")
                state[kind][name] = arr.astype(np.int64)
            elif arr.shape != tuple(self.params[name].shape):
                raise ValueError(f"`{key}` has shape {arr.shape}, parameter {tuple(self.params[name].shape)}")
            else:
                state[kind][name] = cp.asarray(np.ascontiguousarray(arr, dtype=np.float32))
        self.state = state


def make_optimizer(config, params: dict, lr_mult: dict | None = None,
                   decay_mult: dict | None = None) -> CudaOptimizer:
    """The optimizer `config.optimizer` names, over `params` (float32 device arrays, updated in place)."""
    return CudaOptimizer(host_optim.make_optimizer(config, params, lr_mult, decay_mult))
