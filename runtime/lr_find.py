"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates for Training Neural
Networks"; fastai's lr_find): train from the current weights with the file's optimizer while the
learning rate grows exponentially from `start` to `end` over `steps` batches, and watch the loss.

The loss of single batches is noisy, so it is smoothed by an exponential moving average with
bias correction (avg ← β·avg + (1−β)·loss, smoothed = avg / (1 − β^t), β = 0.98): the first
points are then plain averages of the few losses seen, not pulled towards zero. The test stops
early when the smoothed loss exceeds 4× the best seen (divergence) or a loss is not finite.

The suggested rate is where the smoothed loss falls fastest: the most negative gradient of the
smoothed loss against log10(lr), over the points before the divergence, leaving out the first 10
(fastai's `skip_start`: a bias-corrected average of a handful of batches has a slope that is
noise, and at the smallest rates nothing is learnt anyway). The lr of the minimum
smoothed loss is reported too (its tenth is the other usual rule). Each step is the training
loop's (Trainer._apply: fp16 loss scaling, clipping, the optimizer) at the sweep's rate. Every
parameter, BatchNorm buffer, the optimizer's state, the step counter, the loss scale and the
dropout generator are restored afterwards, bit for bit: the range test leaves the model as it
found it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnc.backends.base import Ctx
from cnnc.dsl.errors import CnncError

from .data import batches
from .files import dumps, write_atomic, write_text_atomic
from .train import Trainer, _bar, _loss_options, _target

BETA = 0.98  # fastai's smoothing
DIVERGE = 4.0  # stop once the smoothed loss exceeds this multiple of the best
# fastai's skip_start: the first smoothed points average so few batches that their slope is noise
SKIP_START = 10
JSON, CSV, PLOT = "lr_find.json", "lr_find.csv", "lr_find.png"


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """`steps` learning rates from `start` to `end`, equally spaced in log(lr)."""
    if not (start > 0 and end > start and math.isfinite(end)):
        raise CnncError(f"--start {start:g} and --end {end:g}: the sweep needs 0 < start < end")
    if steps < 2:
        raise CnncError(f"--steps {steps}: the sweep needs 2 steps or more")
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


@dataclass
class RangeTest:
    """The losses of a range test as they arrive: smoothing and the divergence rule."""

    beta: float = BETA
    diverge: float = DIVERGE
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged_at: int | None = None  # index of the point that showed the divergence
    _avg: float = 0.0
    _best: float = math.inf

    def add(self, lr: float, loss: float) -> bool:
        """Record one step; True when the test should stop (it diverged)."""
        i = len(self.losses)
        self.lrs.append(float(lr))
        self.losses.append(float(loss))
        if not math.isfinite(loss):
            self.smoothed.append(math.inf)
            self.diverged_at = i
            return True
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** (i + 1))
        self.smoothed.append(smooth)
        if i > 0 and smooth > self.diverge * self._best:
            self.diverged_at = i
            return True
        self._best = min(self._best, smooth)
        return False

    def usable(self) -> int:
        """How many points precede the divergence (all of them without one)."""
        return len(self.losses) if self.diverged_at is None else self.diverged_at

    def steepest(self) -> int | None:
        """Index of the most negative d(smoothed)/d(log10 lr) before the divergence, past the first
        SKIP_START points; None with fewer than 2 points."""
        n = self.usable()
        if n < 2:
            return None
        slope = np.gradient(np.asarray(self.smoothed[:n]), np.log10(np.asarray(self.lrs[:n])))
        skip = SKIP_START if n >= SKIP_START + 2 else 0
        return skip + int(np.argmin(slope[skip:]))

    def minimum(self) -> int | None:
        n = self.usable()
        return int(np.argmin(self.smoothed[:n])) if n else None


@dataclass
class LrFindResult:
    network: str
    optimizer: str
    batch: int
    start: float
    end: float
    steps: int
    test: RangeTest
    seconds: float
    out_dir: str = ""
    notes: list[str] = field(default_factory=list)  # what was written where

    @property
    def suggestion(self) -> float | None:
        i = self.test.steepest()
        return None if i is None else self.test.lrs[i]

    @property
    def min_loss_lr(self) -> float | None:
        i = self.test.minimum()
        return None if i is None else self.test.lrs[i]

    def to_json(self) -> dict:
        t = self.test
        d = t.diverged_at
        return {"network": self.network, "optimizer": self.optimizer, "batch": self.batch, "start": self.start,
                "end": self.end, "steps": self.steps, "steps_run": len(t.losses), "beta": t.beta,
                "diverge_factor": t.diverge, "suggested_lr": self.suggestion, "suggested_step": t.steepest(),
                "min_loss_lr": self.min_loss_lr, "min_loss_step": t.minimum(),
                "diverged_step": d, "diverged_lr": None if d is None else t.lrs[d], "seconds": self.seconds,
                "lr": t.lrs, "loss": t.losses, "smoothed": t.smoothed}

    def summary(self) -> str:
        t = self.test
        lines = [f"lr-find {self.network}: {len(t.losses)} of {self.steps} steps, lr {self.start:g} → {self.end:g}, "
                 f"{self.optimizer}, batch {self.batch}, {self.seconds:.1f} s"]
        if t.diverged_at is not None:
            d = t.diverged_at
            why = (f"loss {t.losses[d]}" if not math.isfinite(t.losses[d]) else
                   f"smoothed loss {t.smoothed[d]:.4g} > {t.diverge:g} × best {min(t.smoothed[:d]):.4g}")
            lines.append(f"diverged at lr {t.lrs[d]:.3g} (step {d + 1}: {why})")
        else:
            lines.append(f"no divergence up to lr {t.lrs[-1]:.3g}")
        if self.suggestion is None:
            lines.append("no suggestion: fewer than 2 steps before the divergence; lower --start")
        else:
            s, m = t.steepest(), t.minimum()
            lines.append(f"minimum smoothed loss {t.smoothed[m]:.4f} at lr {t.lrs[m]:.3g} (a tenth of it: "
                         f"{t.lrs[m] / 10:.3g})")
            lines.append(f"suggested learning rate: {self.suggestion:.3g} (steepest descent of the smoothed loss, "
                         f"step {s + 1}, loss {t.smoothed[s]:.4f})")
        return "\n".join(lines)


def run_range_test(trainer: Trainer, start: float = 1e-7, end: float = 10.0, steps: int = 100,
                   beta: float = BETA, diverge: float = DIVERGE) -> LrFindResult:
    """The range test on the trainer's model, data and optimizer; everything it changes is put back."""
    lrs = lr_schedule(start, end, steps)
    m, be, cfg = trainer.model, trainer.model.backend, trainer.config
    if trainer.comm.size > 1:
        raise CnncError("lr-find runs in one process; start it without mpiexec")
    if cfg.optimizer == "rprop":  # its steps come from the gradients' signs: the sweep's rates would not be used
        raise CnncError("lr-find sweeps the learning rate of every step; rprop takes `lr` only as its first step "
                        "size and then adapts each weight's step itself",
                        hint="run lr-find with another --optimizer, or compare rates with --sweep lr=...")
    saved_params = {k: np.array(v, copy=True) for k, v in m.host_params().items()}
    saved_optim = {k: np.array(v, copy=True) for k, v in trainer.optimizer.state_dict().items()}
    saved_rng = trainer.dropout_rng.bit_generator.state
    saved_step = trainer.step
    saved_scaler = trainer.scaler.state_dict() if trainer.scaler is not None else None
    test = RangeTest(beta, diverge)
    classes = int(m.classes)
    t0 = time.perf_counter()
    try:
        source = _endless_batches(trainer)
        with np.errstate(all="ignore"):  # an overflow is a non-finite loss: the divergence the test looks for
            for i, lr in enumerate(lrs):
                xb, yb = next(source)
                ctx = Ctx(training=True, rng=trainer.dropout_rng)
                out = trainer.executor.forward(be.to_device(xb), ctx)
                loss, dout = trainer.loss_fn(out, be.to_device(_target(yb, classes, cfg.loss)),
                                             **_loss_options(cfg.loss, cfg.label_smoothing))
                stop = test.add(float(lr), float(loss))
                trainer.progress.update(f"lr-find {_bar((i + 1) / steps)} {i + 1}/{steps} lr {lr:.3g} "
                                        f"loss {float(loss):.4f} smoothed {test.smoothed[-1]:.4f}",
                                        done=stop or i == steps - 1)
                if stop:
                    break
                scaler = trainer.scaler
                grads = trainer.executor.backward(dout if scaler is None else scaler.scaled(dout))
                # the training loop's step (loss scaling, clipping, the optimizer) at this rate
                trainer._apply({k: g for k, g in grads.items() if k in trainer.trainable and g is not None}, 1,
                               float(lr))
    finally:
        m.set_params(saved_params, "the weights before lr-find")
        trainer.optimizer.load_state_dict(saved_optim)
        trainer.dropout_rng.bit_generator.state = saved_rng
        trainer.step = saved_step
        if saved_scaler is not None:
            trainer.scaler.load_state_dict(saved_scaler)
        if getattr(trainer.data, "streamed", False):
            trainer.data.close()
    return LrFindResult(m.name, _optimizer_text(cfg), cfg.batch, start, end, steps, test, time.perf_counter() - t0)


def _optimizer_text(cfg) -> str:
    extra = f" momentum {cfg.momentum:g}" if cfg.momentum else ""
    return cfg.optimizer + extra + (f" weight_decay {cfg.weight_decay:g}" if cfg.weight_decay else "")


def _endless_batches(trainer: Trainer):
    """Shuffled training batches, epoch after epoch, as the training loop draws them (with its augmentation)."""
    cfg, data = trainer.config, trainer.data
    e = 0
    while True:
        if getattr(data, "streamed", False):
            yield from data.train_batches(e)
        else:
            rng = np.random.default_rng([cfg.seed, e])
            yield from batches(data.train_x, data.train_y, cfg.batch, shuffle=True, rng=rng, augment=trainer.augment)
        e += 1


def write_outputs(result: LrFindResult, out_dir: Path) -> list[str]:
    """lr_find.json, lr_find.csv and lr_find.png in out_dir; returns lines saying what was written."""
    out_dir = Path(out_dir)
    result.out_dir = str(out_dir)
    t = result.test
    write_text_atomic(out_dir / JSON, dumps(result.to_json(), indent=1))
    rows = ["step,lr,loss,smoothed"] + [f"{i + 1},{lr!r},{loss!r},{s!r}"
                                         for i, (lr, loss, s) in enumerate(zip(t.lrs, t.losses, t.smoothed))]
    write_text_atomic(out_dir / CSV, "\n".join(rows) + "\n")
    return [f"curve: {out_dir / JSON}, {out_dir / CSV}", write_plot(result, out_dir / PLOT)]


def write_plot(result: LrFindResult, path: Path) -> str:
    """Loss against learning rate (log axis), raw and smoothed, the suggestion and the divergence marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "for a plot of the curve: pip install 'cnnc[plot]' (matplotlib)"
    t = result.test
    lrs, raw, smooth = np.asarray(t.lrs), np.asarray(t.losses), np.asarray(t.smoothed)
    n = t.usable()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.semilogx(lrs, np.where(np.isfinite(raw), raw, np.nan), color="0.6", lw=0.8, alpha=0.7, label="batch loss")
    ax.semilogx(lrs[:n], smooth[:n], color="C0", lw=2, label=f"smoothed (EMA β={t.beta:g}, bias-corrected)")
    top = 1.1 * float(np.max(smooth[:n])) if n else 1.0
    bottom = float(np.nanmin(np.where(np.isfinite(raw), raw, np.nan))) if np.isfinite(raw).any() else 0.0
    s, mn = t.steepest(), t.minimum()
    if s is not None:
        ax.plot(lrs[s], smooth[s], "o", color="C2", ms=9,
                label=f"suggested {lrs[s]:.3g} (steepest descent)")
        ax.plot(lrs[mn], smooth[mn], "v", color="C1", ms=8, label=f"minimum at {lrs[mn]:.3g}")
    if t.diverged_at is not None:
        d = t.diverged_at
        ax.axvline(lrs[d], color="C3", ls="--", lw=1)
        ax.plot(lrs[d], min(smooth[d], top) if np.isfinite(smooth[d]) else top, "x", color="C3", ms=10, mew=2,
                label=f"diverged at {lrs[d]:.3g}")
    ax.set_ylim(max(bottom - 0.05 * (top - bottom), 0 if bottom >= 0 else bottom * 1.1), top)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr-find {result.network}: {result.optimizer}, batch {result.batch}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90))
    finally:
        plt.close(fig)
    return f"plot: {path}"


def lr_find(path=None, *, start: float = 1e-7, end: float = 10.0, steps: int = 100, out_dir=None,
            progress: bool = True, **prepare_kwargs) -> LrFindResult:
    """`cnnc lr-find`: the range test on a .cnn file's network (or a run's checkpoint with `resume=`),
    with the data and settings `cnnc train` would use; writes the curve and the plot to out_dir
    (default runs/NETWORK-lr-find[-N])."""
    from .api import _fresh_run_dir, prepare

    lr_schedule(start, end, steps)  # refuse a bad sweep before loading anything
    trainer, notes = prepare(path, progress=progress, **prepare_kwargs)
    for note in notes:
        trainer.progress.line(note)
    result = run_range_test(trainer, start, end, steps)
    out = Path(out_dir) if out_dir is not None else _fresh_run_dir(f"{trainer.model.name}-lr-find")
    result.out_dir = str(out)
    result.notes = write_outputs(result, out)
    return result
