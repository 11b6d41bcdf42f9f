"""Optimizers: the update rules of torch.optim (and TensorFlow's FTRL), in numpy float32.

The rules live with the backends because every backend's optimizer is held to them: the NumPy
backend trains with these classes, and the CUDA backend (backends/cuda/optim.py) resolves a
configuration with `make_optimizer` and runs each rule's update in its own kernel, matching these
bit for bit. The runtime imports them through runtime/optim.py.

`make_optimizer(config, params)` returns an `Optimizer` whose `step(grads, lr)` updates every
parameter that has a gradient, in place (the runtime and the backends hold references to the
arrays). Arithmetic stays in float32 and follows torch's single-tensor code line by line, so a
run matches torch.optim to float32 rounding; scalars are Python floats, which numpy casts to the
array's float32 as torch casts its `alpha`/`value` arguments.

Per parameter w with gradient g, effective learning rate η = lr·lr_mult[w] and weight decay
λ = weight_decay·decay_mult[w] (Caffe's per-layer multipliers). Except for AdamW, weight decay is
L2 added to the gradient first: g ← g + λ·w. An η of 0 (lr_mult 0: Caffe's frozen layer) leaves
the parameter and its state untouched.

- sgd: w ← w − η·g. With config.momentum > 0 it is momentum SGD (below). config.nesterov = true
  turns sgd and momentum into nesterov.
- momentum: b ← g on the first step, then b ← μ·b + g; w ← w − η·b  (torch.optim.SGD, dampening 0).
  μ = config.momentum, or 0.9 when the config leaves momentum at 0 (naming the optimizer
  `momentum` asks for momentum; 0.9 is the usual value).
- nesterov: b as above, w ← w − η·(g + μ·b); same rule for μ.
- adagrad: s ← s + g²; w ← w − η·g/(√s + ε). ε = config.eps (default 1e-8, where torch's
  Adagrad defaults to 1e-10); initial accumulator 0, no lr decay.
- rmsprop: v ← ρ·v + (1−ρ)·g²; a = √v + ε; without momentum w ← w − η·g/a, with momentum
  μ = config.momentum: b ← μ·b + g/a (b starts at 0), w ← w − η·b  (torch.optim.RMSprop,
  alpha = config.rho).
- adadelta: v ← ρ·v + (1−ρ)·g²; d = √(u + ε)/√(v + ε)·g; u ← ρ·u + (1−ρ)·d²; w ← w − η·d
  (torch.optim.Adadelta; η is config.lr, where torch's default is 1.0).
- rprop: full-batch Rprop (Riedmiller & Braun 1993, "RPROP-"; torch.optim.Rprop). Each weight has its
  own step size Δ (starting at η of its first step) and remembers its last gradient g⁻ (starting 0):
      Δ ← clamp(Δ·η⁺, Δmin, Δmax) where g·g⁻ > 0,  clamp(Δ·η⁻, Δmin, Δmax) where g·g⁻ < 0
      g ← 0 where g·g⁻ < 0 (a sign change: no move this step, and no change of Δ next step)
      w ← w − sign(g)·Δ;  g⁻ ← g
  (η⁻, η⁺) = config.etas, default (0.5, 1.2); (Δmin, Δmax) = config.step_sizes, default (1e-6, 50).
  Only the gradient's sign is used, so the rule needs the gradient of the whole training set (batch ·
  accumulate ≥ the training images): mini-batch gradients change sign with the batch, not with the
  slope. RMSProp is the mini-batch form of Rprop (Hinton's lecture 6e): dividing g by √(running mean
  of g²) is a step that follows the sign of g with a size that is steady from batch to batch. The
  learning rate only sets the initial step; a schedule does not change Δ afterwards.
- adam: t ← t+1; m ← lerp(m, g, 1−β1); v ← β2·v + (1−β2)·g²;
  w ← w − η/(1−β1ᵗ) · m/(√v/√(1−β2ᵗ) + ε)  (torch.optim.Adam, L2 weight decay).
- adamw: as adam without the L2 term, and first w ← w·(1 − η·λ)  (torch.optim.AdamW).
- ftrl: FTRL-Proximal (McMahan et al. 2013, "Ad Click Prediction"), as TensorFlow's
  ApplyFtrl with learning_rate_power p = config.lr_power (≤ 0), l1, l2 and initial accumulator 0.1.
  Per coordinate, with accumulator n (starts 0.1) and linear term z (starts 0):
      n' = n + g²
      σ  = (n'^(−p) − n^(−p)) / η
      z  ← z + g − σ·w
      n  ← n'
      w  ← (sign(z)·l1 − z) / (n^(−p)/η + 2·l2)   if |z| > l1,   else 0
  With p = −0.5 this is the paper's per-coordinate rate η/√n.

`state_dict()` is flat: "<state>/<param>" → numpy array (step counters are 0-d int64 arrays);
`load_state_dict` restores it so that a resumed run continues bit for bit.
"""

from __future__ import annotations

import numpy as np

from cnnc.compiler.train_config import TrainConfig

DEFAULT_MOMENTUM = 0.9  # for `momentum`/`nesterov` when the config leaves momentum at 0
FTRL_INITIAL_ACCUMULATOR = 0.1  # TensorFlow's default


class Optimizer:
    """Base: per-parameter multipliers, L2 weight decay, state bookkeeping. Subclasses define `_update`."""

    name = "optimizer"
    STATE: tuple[str, ...] = ()  # the state kinds a subclass keeps, for load_state_dict's checks
    decoupled_decay = False  # AdamW applies decay to the weights, not the gradient

    def __init__(self, params: dict[str, np.ndarray], lr_mult: dict[str, float] | None = None,
                 decay_mult: dict[str, float] | None = None, weight_decay: float = 0.0):
        for k, p in params.items():
            if getattr(p, "dtype", None) != np.float32:
                raise TypeError(f"parameter `{k}` must be a float32 array, got "
                                f"{getattr(p, 'dtype', type(p).__name__)}")
        self.params = params
        # multipliers may name more tensors than are optimized (buffers, frozen layers): those are ignored
        self.lr_mult = {k: float((lr_mult or {}).get(k, 1.0)) for k in params}
        self.decay_mult = {k: float((decay_mult or {}).get(k, 1.0)) for k in params}
        self.weight_decay = float(weight_decay)
        self.state: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in self.STATE}

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.apply(self.updates(grads, lr))

    def apply(self, updates: list[tuple]) -> None:
        """The rule over `updates` (what `updates` returns): L2 weight decay, then each update."""
        for name, p, g, eta, wd in updates:
            if wd != 0.0 and not self.decoupled_decay:
                g = g + wd * p  # torch: grad.add(param, alpha=weight_decay), a new tensor
            self._update(name, p, g, eta, wd)

    def updates(self, grads: dict[str, np.ndarray], lr: float) -> list[tuple]:
        """(name, parameter, float32 gradient, η, λ) of each parameter this step moves (η ≠ 0), the
        gradients checked against the parameters."""
        out = []
        for name, g in grads.items():
            if name not in self.params:
                raise KeyError(f"gradient for unknown parameter `{name}`")
            p = self.params[name]
            if getattr(g, "dtype", None) != np.float32:
                g = np.asarray(g, dtype=np.float32)
            if g.shape != p.shape:
                raise ValueError(f"gradient for `{name}` has shape {g.shape}, parameter {p.shape}")
            eta = float(lr) * self.lr_mult[name]
            if eta != 0.0:
                out.append((name, p, g, eta, self.weight_decay * self.decay_mult[name]))
        return out

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float, wd: float) -> None:
        """One optimizer's rule: each subclass defines it."""
        raise TypeError(f"{type(self).__name__} defines no update rule")

    def _buf(self, kind: str, name: str, fill: float = 0.0) -> np.ndarray:
        """The state array `kind` of parameter `name`, created (filled with `fill`) on first use, as torch does."""
        bufs = self.state[kind]
        if name not in bufs:
            bufs[name] = np.full_like(self.params[name], fill)
        return bufs[name]

    def _count(self, name: str) -> int:
        """Increment and return the parameter's step counter (torch keeps one per parameter)."""
        steps = self.state["step"]
        steps[name] = np.asarray(int(steps.get(name, 0)) + 1, dtype=np.int64)
        return int(steps[name])

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"{kind}/{name}": arr.copy() for kind, bufs in self.state.items() for name, arr in bufs.items()}

    def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
        state: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in self.STATE}
        for key, value in d.items():
            kind, _, name = key.partition("/")
            if kind not in state:
                raise KeyError(f"`{key}`: {self.name} keeps no state `{kind}` (it keeps {', '.join(self.STATE) or 'none'})")
            if name not in self.params:
                raise KeyError(f"`{key}`: no parameter `{name}`")
            arr = np.array(value)  # a copy: the checkpoint's arrays stay the caller's
            if kind == "step":
                if arr.shape != ():
                    raise ValueError(f"`{key}`: a step counter is a 0-d array, got shape {arr.shape}")
                arr = arr.astype(np.int64)
            elif arr.shape != self.params[name].shape:
                raise ValueError(f"`{key}` has shape {arr.shape}, parameter {self.params[name].shape}")
            else:
                arr = arr.astype(np.float32, copy=False)
            state[kind][name] = arr
        self.state = state


class SGD(Optimizer):
    name = "sgd"
    STATE = ("momentum_buffer",)

    def __init__(self, params, lr_mult=None, decay_mult=None, weight_decay=0.0, momentum=0.0, nesterov=False):
        super().__init__(params, lr_mult, decay_mult, weight_decay)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")

    def _update(self, name, p, g, lr, wd):
        m = self.momentum
        if m != 0:
            bufs = self.state["momentum_buffer"]
            if name not in bufs:
                buf = bufs[name] = g.copy()  # torch starts the buffer at the first gradient
            else:
                buf = bufs[name]
                buf *= m
                buf += g
            g = g + m * buf if self.nesterov else buf
        p += -lr * g


class Adagrad(Optimizer):
    name = "adagrad"
    STATE = ("step", "sum")

    def __init__(self, params, lr_mult=None, decay_mult=None, weight_decay=0.0, eps=1e-10):
        super().__init__(params, lr_mult, decay_mult, weight_decay)
        self.eps = float(eps)

    def _update(self, name, p, g, lr, wd):
        self._count(name)
        s = self._buf("sum", name)
        s += g * g
        std = np.sqrt(s)
        std += self.eps
        p += -lr * (g / std)


class RMSprop(Optimizer):
    name = "rmsprop"
    STATE = ("step", "square_avg", "momentum_buffer")

    def __init__(self, params, lr_mult=None, decay_mult=None, weight_decay=0.0, alpha=0.99, eps=1e-8, momentum=0.0):
        super().__init__(params, lr_mult, decay_mult, weight_decay)
        self.alpha, self.eps, self.momentum = float(alpha), float(eps), float(momentum)

    def _update(self, name, p, g, lr, wd):
        self._count(name)
        v = self._buf("square_avg", name)
        v *= self.alpha
        v += (1 - self.alpha) * g * g
        avg = np.sqrt(v)
        avg += self.eps
        if self.momentum > 0:
            buf = self._buf("momentum_buffer", name)  # torch starts this one at zero
            buf *= self.momentum
            buf += g / avg
            p += -lr * buf
        else:
            p += -lr * (g / avg)


class Adadelta(Optimizer):
    name = "adadelta"
    STATE = ("step", "square_avg", "acc_delta")

    def __init__(self, params, lr_mult=None, decay_mult=None, weight_decay=0.0, rho=0.9, eps=1e-6):
        super().__init__(params, lr_mult, decay_mult, weight_decay)
        self.rho, self.eps = float(rho), float(eps)

    def _update(self, name, p, g, lr, wd):
        self._count(name)
        rho = self.rho
        v = self._buf("square_avg", name)
        u = self._buf("acc_delta", name)
        v *= rho
        v += (1 - rho) * g * g
        std = np.sqrt(v + self.eps)
        delta = np.sqrt(u + self.eps)
        delta /= std
        delta *= g
        u *= rho
        u += (1 - rho) * delta * delta
        p += -lr * delta


class Rprop(Optimizer):
    name = "rprop"
    STATE = ("step", "prev", "step_size")

    def __init__(self, params, lr_mult=None, decay_mult=None, weight_decay=0.0, etas=(0.5, 1.2),
                 step_sizes=(1e-6, 50.0)):
        super().__init__(params, lr_mult, decay_mult, weight_decay)
        (self.etaminus, self.etaplus), (self.step_min, self.step_max) = map(float, etas), map(float, step_sizes)
        if not 0 < self.etaminus < 1 < self.etaplus:
            raise ValueError(f"Rprop needs 0 < etaminus < 1 < etaplus, got etas ({self.etaminus}, {self.etaplus})")
        if not 0 < self.step_min <= self.step_max:
            raise ValueError(f"Rprop needs 0 < min ≤ max step size, got ({self.step_min}, {self.step_max})")

    def _update(self, name, p, g, lr, wd):
        self._count(name)
        prev = self._buf("prev", name)
        step = self._buf("step_size", name, lr)  # torch: full_like(grad, lr) on the first step
        product = g * prev  # float32, as torch's grad.mul(prev): a product that underflows counts as 0
        factor = np.where(product > 0, np.float32(self.etaplus),
                          np.where(product < 0, np.float32(self.etaminus), np.float32(1)))
        step *= factor
        np.clip(step, np.float32(self.step_min), np.float32(self.step_max), out=step)
        g = np.where(product < 0, np.float32(0), g)
        p -= np.sign(g) * step
        prev[...] = g


class Adam(Optimizer):
    name = "adam"
    STATE = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr_mult=None, decay_mult=None, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(params, lr_mult, decay_mult, weight_decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def _update(self, name, p, g, lr, wd):
        t = self._count(name)
        if self.decoupled_decay and wd != 0:
            p *= 1 - lr * wd
        m = self._buf("exp_avg", name)
        v = self._buf("exp_avg_sq", name)
        _lerp(m, g, np.float32(1 - self.beta1))
        v *= self.beta2
        v += (1 - self.beta2) * g * g
        step_size = lr / (1 - self.beta1 ** t)
        bias_correction2_sqrt = (1 - self.beta2 ** t) ** 0.5
        denom = np.sqrt(v) / bias_correction2_sqrt
        denom += self.eps
        p += -step_size * (m / denom)


class AdamW(Adam):
    name = "adamw"
    decoupled_decay = True


def _lerp(a: np.ndarray, b: np.ndarray, w: np.float32) -> None:
    """a ← a + w·(b − a) in place, with the two-sided formula torch's lerp uses for accuracy."""
    if w < 0.5:
        a += w * (b - a)
    else:
        a[...] = b - (b - a) * (np.float32(1) - w)


class Ftrl(Optimizer):
    name = "ftrl"
    STATE = ("step", "accumulator", "linear")

    def __init__(self, params, lr_mult=None, decay_mult=None, weight_decay=0.0, lr_power=-0.5, l1=0.0, l2=0.0,
                 initial_accumulator=FTRL_INITIAL_ACCUMULATOR):
        super().__init__(params, lr_mult, decay_mult, weight_decay)
        if lr_power > 0:  # n^(−p) would shrink as gradients accumulate: the rate would grow without bound
            raise ValueError(f"FTRL needs lr_power ≤ 0 (as TensorFlow), got {lr_power}")
        if initial_accumulator <= 0:
            raise ValueError(f"FTRL needs a positive initial accumulator, got {initial_accumulator}")
        self.lr_power, self.l1, self.l2 = float(lr_power), float(l1), float(l2)
        self.initial_accumulator = float(initial_accumulator)

    def _update(self, name, p, g, lr, wd):
        self._count(name)
        n = self._buf("accumulator", name, self.initial_accumulator)
        z = self._buf("linear", name)
        neg_p = -self.lr_power
        n_new = n + g * g
        n_new_pow = np.power(n_new, neg_p, dtype=np.float32)
        sigma = (n_new_pow - np.power(n, neg_p, dtype=np.float32)) / lr
        z += g - sigma * p
        n[...] = n_new
        quadratic = n_new_pow / lr + 2 * self.l2
        l1 = np.float32(self.l1)
        p[...] = np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / quadratic, np.float32(0))


def make_optimizer(config: TrainConfig, params: dict[str, np.ndarray], lr_mult: dict[str, float] | None = None,
                   decay_mult: dict[str, float] | None = None) -> Optimizer:
    """The optimizer `config.optimizer` names, over `params` (float32 arrays, updated in place)."""
    kind = config.optimizer
    common = dict(params=params, lr_mult=lr_mult, decay_mult=decay_mult, weight_decay=config.weight_decay)
    if kind in ("sgd", "momentum", "nesterov"):
        nesterov = kind == "nesterov" or config.nesterov
        momentum = config.momentum
        if momentum == 0 and (kind != "sgd" or nesterov):
            momentum = DEFAULT_MOMENTUM
        opt = SGD(**common, momentum=momentum, nesterov=nesterov)
        opt.name = kind
        return opt
    if kind == "adagrad":
        return Adagrad(**common, eps=config.eps)
    if kind == "rmsprop":
        return RMSprop(**common, alpha=config.rho, eps=config.eps, momentum=config.momentum)
    if kind == "adadelta":
        return Adadelta(**common, rho=config.rho, eps=config.eps)
    if kind == "rprop":
        return Rprop(**common, etas=config.etas, step_sizes=config.step_sizes)
    if kind == "adam":
        return Adam(**common, beta1=config.beta1, beta2=config.beta2, eps=config.eps)
    if kind == "adamw":
        return AdamW(**common, beta1=config.beta1, beta2=config.beta2, eps=config.eps)
    if kind == "ftrl":
        return Ftrl(**common, lr_power=config.lr_power, l1=config.l1, l2=config.l2)
    raise ValueError(f"unknown optimizer `{kind}`")
