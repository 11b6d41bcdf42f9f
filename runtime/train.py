"""The training loop: mini-batch SGD-family training with checkpoints, resume and sanity checks.

Determinism: epoch e shuffles and augments with a generator seeded by (seed, e); dropout draws
from one generator whose state travels in the checkpoint. So k epochs, then `--resume` to N,
gives the same weights as N epochs in one run, bit for bit. Ctrl-C finishes the optimizer step
in flight, writes a checkpoint with the data cursor, and stops. A streamed image folder
(runtime/images.py) draws each sample's augmentation from (seed, epoch, sample), so a resumed
epoch starts at its cursor without preparing the batches before it; its worker processes are
shut down when the run ends, however it ends.

Files: at the end of every epoch the checkpoint is written first and `metrics.jsonl` is then
rewritten from the checkpoint's history, both atomically (with `tensorboard`, TensorBoard event
files beside them get the same figures: runtime/tensorboard.py), so the metrics never run ahead of
the checkpoint and a resume never repeats an epoch in them. A checkpoint read back is checked
field by field (`CheckpointMeta`) and against the run: a damaged one is refused with the file
and the field named, never half-restored.

Sanity checks from practice: the first loss should be near ln(classes) (0.69 for two classes,
2.30 for ten), else a warning names the usual causes (compiler/lint.py); a NaN/inf or exploding
loss stops training naming the iteration. The static rules of the training lint are checked by
api.prepare before the first batch.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from cnnc.backends.base import Ctx, Plan
from cnnc.compiler.lint import initial_loss_warning
from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import CnncError

from .amp import AmpState, scaler_for
from .checkpoint import parameters, read_npz, write_npz
from .files import dumps, field_error, write_atomic, write_text_atomic
from .data import Augment, Dataset, _augment, batches
from .distributed import Communicator, ranks_line, world
from .executor import Executor
from .model import Model
from .optim import state_arrays
from .schedules import make_schedule

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
PLOT = "curves.png"


@dataclass
class TrainResult:
    epochs: int
    initial_loss: float
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float
    run_dir: str
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)
    bad_images: int = 0  # unreadable files skipped (streamed image folders)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EpochRecord(_Strict):
    epoch: Annotated[int, Field(ge=1)]
    train_loss: float | None
    train_accuracy: Annotated[float, Field(ge=0, le=1)] | None
    test_loss: float | None
    test_accuracy: Annotated[float, Field(ge=0, le=1)] | None
    test_top5: Annotated[float, Field(ge=0, le=1)] | None = None  # with more than 5 classes
    lr: float | None
    seconds: Annotated[float, Field(ge=0)]
    bad_images: NonNegativeInt | None = None  # streamed image folders: unreadable files skipped so far


class ScheduleState(_Strict):
    epochs: NonNegativeInt
    plateau_lr: Annotated[float, Field(ge=0)]
    best: float | None  # None: no validation loss seen yet
    bad_epochs: NonNegativeInt


class CheckpointMeta(_Strict):
    """The metadata of a training checkpoint: every field checked when it is read back."""

    kind: Literal["checkpoint"]
    network: str
    signature: str
    epoch: NonNegativeInt  # completed epochs
    cursor: NonNegativeInt  # batches of the current epoch already trained on
    partial: tuple[float, NonNegativeInt, NonNegativeInt]  # loss sum, images, correct so far
    step: NonNegativeInt  # optimizer steps taken
    initial_loss: float | None
    dropout_rng: dict
    schedule: ScheduleState
    history: list[EpochRecord]
    config: dict
    optim_keys: list[str] | None = None  # the optimizer state arrays the file holds (absent before 0.1.1)
    amp: AmpState | None = None  # precision fp16: the loss scaler's state (runtime/amp.py)


def training_plan(model: Model, batch: int, opt_level: int = 2) -> Plan:
    """The plan a training step runs: the -O2 training rewrites (fused epilogues and element-wise
    chains, layouts; never BatchNorm folding or dropout removal, which would change gradients) give
    the plain plan's gradients to the bit with fewer passes over memory. opt_level 0: the plain plan."""
    if opt_level == 0:
        return model.plan
    from cnnc.compiler.pipeline import PassContext, optimize
    ctx = type(model.backend).configure(PassContext(batch=batch, opt_level=opt_level, mode="training"))
    plan = model.backend.compile(optimize(model.graph, ctx, model.host_params()))
    return model.backend.precision_plan(plan, model.precision)  # the precision model.plan computes in


def _logits_plan(plan: Plan, loss: str) -> Plan:
    """Cross-entropy takes logits: a network that ends in an op the loss includes (softmax, op table
    `loss_absorbs`) trains on that op's input."""
    last = plan.steps[-1] if plan.steps else None
    if last is not None and loss in OPS[last.node.op].loss_absorbs and last.node.id == plan.output:
        return Plan(plan.steps[:-1], plan.input, last.inputs[0], plan.param_specs, plan.graph)
    return plan


class Progress:
    """One line per epoch on stderr, redrawn in place on a terminal; the final state otherwise."""

    def __init__(self, stream, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.last = 0.0

    def update(self, text: str, done: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and (done or now - self.last > 0.1):
            self.stream.write("\r\033[K" + text + ("\n" if done else ""))
            self.stream.flush()
            self.last = now
        elif not self.tty and done:
            self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()


def _bar(frac: float, width: int = 24) -> str:
    filled = int(round(frac * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _fmt_time(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f}m"


@dataclass
class Evaluation:
    """Mean loss, top-1 accuracy, confusion matrix (rows: true class, columns: predicted) and top-5
    accuracy (None with 5 classes or fewer). Unpacks as (loss, accuracy, confusion)."""

    loss: float
    accuracy: float
    confusion: np.ndarray
    top5: float | None = None
    images: int = 0

    def __iter__(self):
        return iter((self.loss, self.accuracy, self.confusion))


def topk_hits(scores: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's true class is among its k highest scores (ties go to the lower class
    index, as argmax breaks them, so top-1 agrees with argmax)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (order == np.asarray(y)[:, None]).any(axis=1)


EVAL_BATCH = 500  # images per evaluation batch, at most
EVAL_CACHE_BYTES = 4 << 20  # training's evaluation: a batch's largest activation about this size


def eval_batch(graph, train_batch: int) -> int:
    """Images per batch for the evaluation after each epoch: as many as keep the largest layer
    output within EVAL_CACHE_BYTES (close to the caches), never fewer than a training batch, at
    most EVAL_BATCH. LeNet-5's 1,000 test digits (18.8 KB a digit at C1), on 2 cores: 24.7 ms at
    500 a batch, 12.4 at 250, 13.3 at 125, 21.7 at 64."""
    g = graph
    per_image = max((d.get("bytes") or 0 for _, d in g.nodes(data=True)), default=0) / max(
        g.graph.get("totals", {}).get("batch", 1), 1)
    fits = int(EVAL_CACHE_BYTES // per_image) if per_image else EVAL_BATCH
    return max(1, min(EVAL_BATCH, max(train_batch, fits)))


def evaluate(model: Model, x: np.ndarray, y: np.ndarray, batch: int = EVAL_BATCH,
             loss_name: str = "cross_entropy", label_smoothing: float = 0.0, plan: Plan | None = None) -> Evaluation:
    """Evaluate on images x, (N, C, H, W), or (N, k, C, H, W) for k crops of each image."""
    return evaluate_batches(model, ((x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)),
                            loss_name, label_smoothing, plan)


def evaluate_data(model: Model, data, batch: int = EVAL_BATCH, loss_name: str = "cross_entropy",
                  label_smoothing: float = 0.0, plan: Plan | None = None) -> Evaluation:
    """evaluate() on the test split of an in-memory Dataset or a streamed one (runtime/images.py)."""
    if getattr(data, "streamed", False):
        return evaluate_batches(model, data.test_batches(), loss_name, label_smoothing, plan)
    return evaluate(model, data.test_x, data.test_y, batch, loss_name, label_smoothing, plan)


def evaluate_batches(model: Model, batches, loss_name: str = "cross_entropy",
                     label_smoothing: float = 0.0, plan: Plan | None = None) -> Evaluation:
    """Evaluate over (xb, yb) batches. A 5-d xb, (B, k, C, H, W), holds k crops of each image (the
    ten crops of `eval_crop ten`): the softmax is averaged over them, and the loss is the
    cross-entropy of that average (with mse: the mean output's). `plan`: the plan to run (training
    evaluates with its own, whose forward gives the plain plan's values to the bit), by default the
    model's plain plan."""
    plan = _logits_plan(model.plan if plan is None else plan, loss_name)
    ex = Executor(plan, model.backend, model.params)
    loss_fn = model.backend.loss(loss_name)
    classes = int(model.classes)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    total, n, top5 = 0.0, 0, 0
    for xb, yb in batches:
        yb = np.asarray(yb)
        if xb.ndim == 5:
            loss, scores = _multi_crop(model, ex, xb, yb, loss_name, label_smoothing)
        else:
            out = ex.forward(model.backend.to_device(xb), Ctx(training=False), keep=False)
            target = _target(yb, classes, loss_name)
            loss, _ = loss_fn(out, model.backend.to_device(target), **_loss_options(loss_name, label_smoothing))
            scores = model.backend.to_host(out).reshape(len(xb), -1)
        total += float(loss) * len(yb)
        n += len(yb)
        np.add.at(confusion, (yb, np.argmax(scores, axis=1)), 1)
        top5 += int(topk_hits(scores, yb, 5).sum()) if classes > 5 else 0
    d = max(n, 1)
    return Evaluation(total / d, float(np.trace(confusion)) / d, confusion, top5 / d if classes > 5 else None, n)


def _multi_crop(model: Model, ex: Executor, xb: np.ndarray, yb: np.ndarray, loss_name: str,
                label_smoothing: float) -> tuple[float, np.ndarray]:
    """(mean loss, averaged scores) of B images of k crops each."""
    b, k = xb.shape[:2]
    flat = np.ascontiguousarray(xb.reshape(b * k, *xb.shape[2:]))
    out = ex.forward(model.backend.to_device(flat), Ctx(training=False), keep=False)
    logits = model.backend.to_host(out).reshape(b, k, -1).astype(np.float64)
    if loss_name == "mse":
        mean = logits.mean(axis=1)
        return float(((mean - _target(yb, mean.shape[1], "mse")) ** 2).mean()), mean
    z = logits - logits.max(axis=2, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=2, keepdims=True)
    probs = p.mean(axis=1)  # the softmax averaged over the crops
    logp = np.log(np.maximum(probs, 1e-300))
    nll = -logp[np.arange(b), yb]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(axis=1)
    return float(nll.mean()), probs


def _loss_options(loss_name: str, label_smoothing: float) -> dict:
    return {"label_smoothing": label_smoothing} if loss_name == "cross_entropy" and label_smoothing else {}


def _target(yb: np.ndarray, classes: int, loss_name: str) -> np.ndarray:
    if loss_name == "mse":  # regression onto one-hot targets
        t = np.zeros((len(yb), classes), dtype=np.float32)
        t[np.arange(len(yb)), yb] = 1.0
        return t
    return yb


class Trainer:
    def __init__(self, model: Model, data: Dataset, config, run_dir: Path, *, progress=True, stream=sys.stderr,
                 comm: Communicator | None = None, opt_level: int = 2):
        self.model, self.data, self.config, self.run_dir = model, data, config, Path(run_dir)
        self.comm = comm if comm is not None else world()
        self.stream = stream
        self.progress = Progress(stream, progress and self.comm.rank == 0)  # rank 0 speaks for the job
        model.use_precision(config.precision)  # conv and dense compute in it (evaluation too); float32 master weights
        self.scaler = scaler_for(config.precision)  # fp16's dynamic loss scaling, else None
        self.plan = _logits_plan(training_plan(model, config.batch, opt_level), config.loss)
        self.executor = Executor(self.plan, model.backend, model.params)
        self.eval_batch = eval_batch(model.graph, config.batch)
        self.loss_fn = model.backend.loss(config.loss)
        self.trainable = {k for k, t in model.trainable().items() if t}
        lr_mult, decay_mult = model.multipliers()
        self.optimizer = model.backend.make_optimizer(config, {k: model.params[k] for k in sorted(self.trainable)},
                                                      lr_mult, decay_mult)
        n = len(data.train_y)
        self.batches_per_epoch = math.ceil(n / config.batch)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.accumulate)
        self.schedule = make_schedule(config, self.steps_per_epoch, config.epochs)
        self.dropout_rng = np.random.default_rng([config.seed, 7919])
        self.epoch = 0  # completed epochs
        self.cursor = 0  # batches of the current epoch already consumed
        self.step = 0  # optimizer steps taken
        self.partial: tuple[float, int, int] = (0.0, 0, 0)  # loss sum, images, correct so far this epoch
        self.initial_loss: float | None = None
        self.history: list[dict] = []
        self.interrupted = False
        self.stopping = False  # under mpiexec: a Ctrl-C the ranks have agreed on (they stop at the same batch)
        self.pending_info: dict | None = None  # run.json for a fresh run, written when training starts
        self.tensorboard = False  # also write TensorBoard event files (runtime/tensorboard.py)
        self.events = None  # their writer while the run goes on (rank 0)
        self.augment = Augment(crop_pad=config.crop, hflip=config.flip) if (config.crop or config.flip) else None
        self.streamed = getattr(data, "streamed", False)  # an image folder read by worker processes
        if self.streamed:
            data.pool.on_bad = lambda path, reason: self.progress.line(f"skipped bad image {path}: {reason}")
        if self.comm.size > 1:
            self._check_parallel()
            if self.comm.rank:  # each rank its own dropout masks; rank 0's stream is the checkpoint's
                self.dropout_rng = np.random.default_rng([config.seed, 7919, self.comm.rank])

    # ---- data parallelism (runtime/distributed.py; docs/distributed.md)
    def _check_parallel(self) -> None:
        cfg, size = self.config, self.comm.size
        if cfg.batch % size:
            raise CnncError(f"batch {cfg.batch} does not split evenly over {size} ranks",
                            hint=f"the batch is the whole step's, shared by the ranks: give a multiple of {size}")
        if cfg.sync_bn and self.model.backend.name != "numpy":
            raise CnncError(f"sync_bn is implemented on the numpy backend, not on {self.model.backend.name}",
                            hint="train without sync_bn (BatchNorm then uses each rank's batch)")

    def _shard_batches(self, rng: np.random.Generator):
        """This rank's part of each step's batch. The order is the one-process run's permutation,
        padded with its first images to a multiple of the ranks (equal-length shards: every rank runs
        the same number of steps, the last one too), so when that needs no padding the ranks together
        see exactly the one-process batches."""
        x, y, size, rank, b = self.data.train_x, self.data.train_y, self.comm.size, self.comm.rank, self.config.batch
        order = rng.permutation(len(x))
        order = np.concatenate([order, order[:(-len(order)) % size]])
        for start in range(0, len(order), b):
            idx = order[start:start + b]
            k = len(idx) // size
            if self.augment is None:
                mine = idx[rank * k:(rank + 1) * k]
                yield np.ascontiguousarray(x[mine], dtype=np.float32), np.ascontiguousarray(y[mine], dtype=np.int64)
            else:  # augmented as the one-process batch (the draws come in batch order), then this rank's part
                xb = _augment(np.ascontiguousarray(x[idx], dtype=np.float32), self.augment, rng)
                yield xb[rank * k:(rank + 1) * k], np.ascontiguousarray(y[idx[rank * k:(rank + 1) * k]], np.int64)

    def _shard_streamed(self, source):
        """This rank's part of each batch of a streamed image folder (runtime/images.py). Every rank
        reads the whole batch (the decoding is repeated N times; the order and the transforms are the
        one-process run's); a last batch that does not split evenly is topped up with its first images."""
        size, rank = self.comm.size, self.comm.rank
        for xb, yb in source:
            k = -(-len(yb) // size)
            idx = np.arange(rank * k, (rank + 1) * k) % len(yb)
            yield np.ascontiguousarray(xb[idx]), np.ascontiguousarray(yb[idx])

    def _bn_reduce(self, v: np.ndarray) -> np.ndarray:
        return self.comm.allreduce_array(np.asarray(v, dtype=np.float64))

    def _buffers(self) -> list[str]:
        """The parameters no optimizer updates (BatchNorm's running statistics)."""
        return [k for k in self.model.params if k not in self.trainable]

    def _average_buffers(self) -> None:
        """Each rank's running statistics, averaged (with sync_bn they agree already)."""
        if self.comm.size == 1 or self.config.sync_bn:
            return
        m, keys = self.model, self._buffers()
        host = [np.array(m.backend.to_host(m.params[k]), dtype=np.float32) for k in keys]
        self.comm.allreduce(host)
        for k, h in zip(keys, host):
            m.params[k][...] = m.backend.to_device(h / np.float32(self.comm.size))

    def sync_from_root(self) -> None:
        """Parameters, BatchNorm buffers and optimizer state from rank 0, at the start and on resume."""
        if self.comm.size == 1:
            return
        m = self.model
        if self.comm.rank == 0:  # always, -q or not: it ties the launcher's messages (by pid) to the ranks
            self.stream.write(f"{self.comm.size} ranks: {ranks_line(self.comm)}\n")
            self.stream.flush()
        else:
            ranks_line(self.comm)
        state = self.comm.bcast({"params": m.host_params(), "optim": self.optimizer.state_dict()}
                                if self.comm.rank == 0 else None)
        if self.comm.rank:
            m.set_params(state["params"], "rank 0's parameters")
            self.optimizer.load_state_dict(state["optim"])

    def _allreduce_grads(self, accum: dict) -> dict:
        """The mean of the ranks' gradients: float32 buffers in reverse parameter order (the order
        backward produces them), bucketed and summed over the ranks, then divided by their number."""
        be = self.model.backend
        keys = [k for k in reversed(list(self.model.params)) if k in accum]
        host = [np.array(be.to_host(accum[k]), dtype=np.float32) for k in keys]
        self.comm.allreduce(host)
        size = np.float32(self.comm.size)
        return {k: be.to_device(h / size) for k, h in zip(keys, host)}

    def _evaluate(self) -> Evaluation:
        """The test split's evaluation; with several ranks each takes a part and the sums are combined."""
        cfg, data, comm = self.config, self.data, self.comm
        if comm.size == 1 or self.streamed:  # a streamed test split: every rank evaluates all of it, alike
            return evaluate_data(self.model, data, self.eval_batch, loss_name=cfg.loss,
                                 label_smoothing=cfg.label_smoothing, plan=self.plan)
        part = np.array_split(np.arange(len(data.test_y)), comm.size)[comm.rank]
        ev = evaluate(self.model, data.test_x[part], data.test_y[part], self.eval_batch, loss_name=cfg.loss,
                      label_smoothing=cfg.label_smoothing, plan=self.plan)
        k = ev.confusion.size
        total = comm.allreduce_array(np.concatenate([[ev.loss * ev.images, ev.images, (ev.top5 or 0.0) * ev.images],
                                                     ev.confusion.ravel().astype(np.float64)]))
        n = max(total[1], 1)
        confusion = np.rint(total[3:3 + k]).astype(np.int64).reshape(ev.confusion.shape)
        return Evaluation(float(total[0] / n), float(np.trace(confusion)) / n, confusion,
                          float(total[2] / n) if ev.top5 is not None else None, int(total[1]))

    # ---- checkpoints
    def save(self) -> None:
        """The checkpoint, then metrics.jsonl rewritten from its history (both atomic). Every rank calls
        it: the running statistics are averaged, rank 0 writes, and all meet after the writing."""
        self._average_buffers()
        if self.comm.rank == 0:
            self._write_checkpoint()
        self.comm.barrier("the barrier after writing the checkpoint")

    def _write_checkpoint(self) -> None:
        m = self.model
        arrays = {f"param/{k}": v for k, v in m.host_params().items()}
        optim = {f"optim/{k}": np.asarray(v) for k, v in self.optimizer.state_dict().items()}
        arrays.update(optim)
        meta = {"kind": "checkpoint", "network": m.name, "signature": m.signature(), "epoch": self.epoch,
                "cursor": self.cursor, "partial": list(self.partial), "step": self.step, "initial_loss": self.initial_loss,
                "dropout_rng": self.dropout_rng.bit_generator.state, "schedule": _jsonable(self.schedule.state_dict()),
                "history": self.history, "config": self.config.model_dump(mode="json"), "optim_keys": sorted(optim)}
        if self.scaler is not None:
            meta["amp"] = self.scaler.state_dict()
        write_npz(self.run_dir / CHECKPOINT, arrays, meta)
        self.write_metrics()

    def write_metrics(self) -> None:
        if self.comm.rank:
            return
        write_text_atomic(self.run_dir / METRICS, "".join(dumps(h) + "\n" for h in self.history))

    def restore(self, path: Path) -> None:
        """Load a checkpoint of this run, or refuse it with the file and the field named."""
        arrays, raw = read_npz(path)
        m = self.model
        if raw.get("kind") != "checkpoint":
            raise CnncError(f"{path} is not a training checkpoint")
        if raw.get("network") != m.name or raw.get("signature") != m.signature():
            raise CnncError(f"{path} was written for network `{raw.get('network')}` with other parameters; "
                            f"this is `{m.name}`", hint="resume with the .cnn file the run was started with")
        try:
            meta = CheckpointMeta(**raw)
        except ValidationError as exc:
            raise field_error(path, exc, of=" of its metadata") from None
        self._check_position(path, meta)
        optim = {k: v for k, v in arrays.items() if k.startswith("optim/")}
        listed = set(optim) if meta.optim_keys is None else set(meta.optim_keys)
        missing, extra = sorted(listed - set(optim)), sorted(set(optim) - listed)
        if not optim and meta.step > 0 and state_arrays(self.config) > 0:
            missing = [f"everything {self.config.optimizer} keeps"]
        if missing or extra:
            which = f"lacks {', '.join(missing[:3])}" if missing else f"has unlisted {', '.join(extra[:3])}"
            raise CnncError(f"{path}: the optimizer state {which}",
                            hint="without it momentum and other running averages would restart silently; "
                                 "resume from another checkpoint or start again")
        for k, v in optim.items():
            if v.dtype.kind not in "fiu":
                raise CnncError(f"{path}: `{k}` holds {v.dtype} values, not real numbers")
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise CnncError(f"{path}: `{k}` holds values that are not finite")
        if self.scaler is not None and meta.amp is None:
            raise CnncError(f"{path}: field `amp` of its metadata (the fp16 loss scale) is missing",
                            hint="the run trains in precision fp16; resume from a checkpoint it wrote")
        params = parameters(arrays, path)
        dropout_rng = np.random.default_rng(0)  # set aside: nothing of this run changes before all is checked
        try:
            dropout_rng.bit_generator.state = meta.dropout_rng
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise CnncError(f"{path}: field `dropout_rng` of its metadata is not a generator state ({exc})") from None
        m.set_params(params, str(path))
        try:
            self.optimizer.load_state_dict({k[6:]: v for k, v in optim.items()})
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise CnncError(f"{path}: its optimizer state does not fit this run: {exc}".replace("\"", "")) from None
        state = meta.schedule.model_dump()
        state["best"] = math.inf if state["best"] is None else state["best"]
        self.schedule.load_state_dict(state)
        if self.scaler is not None:
            self.scaler.load_state_dict(meta.amp)
        self.dropout_rng = dropout_rng
        self.epoch, self.cursor, self.step = meta.epoch, meta.cursor, meta.step
        self.partial = (float(meta.partial[0]), int(meta.partial[1]), int(meta.partial[2]))
        self.initial_loss = meta.initial_loss
        self.history = [{k: v for k, v in h.model_dump(exclude_unset=True).items() if k != "test_top5" or v is not None}
                        for h in meta.history]

    def _check_position(self, path: Path, meta: CheckpointMeta) -> None:
        """The counters of a checkpoint must agree with each other and with this run's data."""
        cfg = self.config
        problems = []
        if meta.cursor >= self.batches_per_epoch:
            problems.append(f"cursor {meta.cursor} is past the {self.batches_per_epoch} batches of an epoch")
        elif meta.cursor % cfg.accumulate:
            problems.append(f"cursor {meta.cursor} is not a multiple of accumulate={cfg.accumulate}")
        elif meta.step != meta.epoch * self.steps_per_epoch + meta.cursor // cfg.accumulate:
            problems.append(f"step {meta.step} does not follow from epoch {meta.epoch} and cursor {meta.cursor} "
                            f"({self.steps_per_epoch} steps per epoch)")
        if len(meta.history) != meta.epoch:
            problems.append(f"history has {len(meta.history)} epochs, the checkpoint says {meta.epoch} were trained")
        seen = meta.partial[1]
        if meta.cursor and (seen != meta.cursor * cfg.batch or meta.partial[2] > seen):
            problems.append(f"partial counts {list(meta.partial)} do not fit cursor {meta.cursor}")
        if meta.schedule.epochs != meta.epoch:
            problems.append(f"schedule.epochs {meta.schedule.epochs} differs from epoch {meta.epoch}")
        if problems:
            raise CnncError(f"{path}: its metadata does not fit this run: {problems[0]}",
                            hint="the checkpoint is damaged, edited, or belongs to a run on other data")

    # ---- the loop
    def run(self) -> TrainResult:
        cfg, data, m = self.config, self.data, self.model
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        previous = signal.getsignal(signal.SIGINT)

        def on_interrupt(signum, frame):
            self.interrupted = True
        try:
            signal.signal(signal.SIGINT, on_interrupt)
        except ValueError:  # not the main thread
            previous = None
        self.sync_from_root()
        if self.tensorboard and self.comm.rank == 0:
            from .tensorboard import EventWriter
            self.events = EventWriter(self.run_dir, self.step)
        try:
            while self.epoch < cfg.epochs and not (self.stopping if self.comm.size > 1 else self.interrupted):
                self._epoch()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self.events is not None:
                self.events.close()
                self.events = None
            if self.streamed:
                self.data.close()
        last = self.history[-1] if self.history else {}
        return TrainResult(self.epoch, float(self.initial_loss or float("nan")), last.get("train_loss", float("nan")),
                           last.get("train_accuracy", float("nan")), last.get("test_loss", float("nan")),
                           last.get("test_accuracy", float("nan")), time.perf_counter() - start, str(self.run_dir),
                           self.interrupted, self.history, len(data.bad_images) if self.streamed else 0)

    def _epoch(self) -> None:
        cfg, data, m, be = self.config, self.data, self.model, self.model.backend
        e = self.epoch
        rng = np.random.default_rng([cfg.seed, e])
        if self.comm.rank:  # a fresh stream each epoch: only rank 0's travels in the checkpoint
            self.dropout_rng = np.random.default_rng([cfg.seed, 7919, self.comm.rank, e])
        with np.errstate(all="ignore"):  # overflow shows up as a non-finite loss, reported below
            stopped = self._batches(e, rng)
        if not stopped:
            self._end_epoch(e)

    def _batches(self, e: int, rng: np.random.Generator) -> bool:
        """Train on one epoch's batches; True when Ctrl-C stopped it (a checkpoint is written)."""
        cfg, data, m, be = self.config, self.data, self.model, self.model.backend
        loss_sum, seen, correct = self.partial if self.cursor else (0.0, 0, 0)
        t0 = time.perf_counter()
        accum: dict = {}
        pending = 0
        pending_loss = 0.0  # the losses of the batches of the step being gathered, for the event files
        classes = int(m.classes)
        parallel = self.comm.size > 1
        if self.streamed:  # each sample's transform has its own generator: start at the cursor
            source = data.train_batches(e, start=self.cursor)
            source = enumerate(self._shard_streamed(source) if parallel else source, start=self.cursor)
        elif parallel:
            source = enumerate(self._shard_batches(rng))
        else:
            source = enumerate(batches(data.train_x, data.train_y, cfg.batch, shuffle=True, rng=rng,
                                       augment=self.augment))
        bn_reduce = self._bn_reduce if parallel and cfg.sync_bn else None
        for b, (xb, yb) in source:
            if b < self.cursor:  # resuming inside an epoch: these batches were trained on already
                continue
            ctx = Ctx(training=True, rng=self.dropout_rng, bn_reduce=bn_reduce)
            out = self.executor.forward(be.to_device(xb), ctx)
            loss, dout = self.loss_fn(out, be.to_device(_target(yb, classes, cfg.loss)),
                                      **_loss_options(cfg.loss, cfg.label_smoothing))
            loss = float(loss)
            n = len(yb)
            hits = int((np.argmax(be.to_host(out).reshape(n, -1), axis=1) == yb).sum())
            if parallel:  # the step's loss and counts over every rank, and whether any was interrupted
                total = self.comm.allreduce_array(np.array([loss * n, n, hits, float(self.interrupted)]))
                loss, n, hits = float(total[0] / total[1]), int(total[1]), int(total[2])
                self.stopping = bool(total[3])
                self.interrupted = self.interrupted or self.stopping
            if self.initial_loss is None:
                self._check_initial(loss)
            if not math.isfinite(loss) or loss > 100 * max(self.initial_loss, 1.0):
                what = "became " + str(loss) if not math.isfinite(loss) else f"exploded to {loss:.3g}"
                raise CnncError(f"training stopped: the loss {what} at iteration {self.step + 1} "
                                f"(epoch {e + 1}, batch {b + 1})",
                                hint=f"try a smaller learning rate than {self.schedule.lr(self.step):g}, "
                                     f"e.g. --lr {cfg.lr / 10:g}")
            grads = self.executor.backward(dout if self.scaler is None else self.scaler.scaled(dout))
            for k in self.trainable:
                g = grads.get(k)
                if g is not None:
                    accum[k] = accum[k] + g if k in accum else g
            pending += 1
            pending_loss += loss
            last_batch = b == self.batches_per_epoch - 1
            if pending == cfg.accumulate or last_batch:
                lr = self.schedule.lr(self.step)
                self._apply(accum, pending)
                if self.events is not None:
                    self.events.step(self.step, pending_loss / pending, lr)
                accum, pending, pending_loss = {}, 0, 0.0
                self.cursor = b + 1
            seen += n
            loss_sum += loss * n
            correct += hits
            self.partial = (loss_sum, seen, correct)
            elapsed = time.perf_counter() - t0
            frac = (b + 1) / self.batches_per_epoch
            rate = seen / max(elapsed, 1e-9)
            eta = (self.batches_per_epoch - b - 1) * cfg.batch / max(rate, 1e-9)
            self.progress.update(
                f"epoch {e + 1}/{cfg.epochs} {_bar(frac)} {b + 1}/{self.batches_per_epoch} "
                f"loss {loss_sum / seen:.4f} acc {100 * correct / seen:.1f}% lr {self.schedule.lr(max(self.step - 1, 0)):.3g} "
                f"{rate:.0f} img/s ETA {_fmt_time(eta)}", done=last_batch)
            if (self.stopping if parallel else self.interrupted) and pending == 0 and not last_batch:
                self.save()
                self.progress.line(f"\ninterrupted: checkpoint written to {self.run_dir / CHECKPOINT} "
                                   f"(epoch {e + 1}, batch {b + 1}); continue with --resume {self.run_dir}")
                return True
        self.epoch_stats = (loss_sum / max(seen, 1), correct / max(seen, 1), time.perf_counter() - t0)
        return False

    def _end_epoch(self, e: int) -> None:
        cfg, data, m = self.config, self.data, self.model
        train_loss, train_acc, seconds = self.epoch_stats
        self._average_buffers()  # evaluation uses the running statistics
        ev = self._evaluate()
        test_loss, test_acc = ev.loss, ev.accuracy
        self.schedule.end_epoch(test_loss)
        record = {"epoch": e + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                  "test_loss": test_loss, "test_accuracy": test_acc, "lr": self.schedule.lr(max(self.step - 1, 0)),
                  "seconds": seconds}
        if ev.top5 is not None:  # top-5 only means something with more than 5 classes
            record["test_top5"] = ev.top5
        if self.streamed:
            record["bad_images"] = len(data.bad_images)
        self.history.append(record)
        top5 = f", top-5 {100 * ev.top5:.2f}%" if ev.top5 is not None else ""
        self.progress.line(f"  validation: loss {test_loss:.4f}, accuracy {100 * test_acc:.2f}%{top5} "
                           f"({len(data.test_y)} images)")
        self.epoch += 1
        self.cursor = 0
        self.save()
        if self.events is not None:
            self.events.epoch(record, self.step, self.steps_per_epoch)

    def _apply(self, accum: dict, pending: int, lr: float | None = None) -> None:
        """One optimizer step at the schedule's rate, or at `lr` (the range test of runtime/lr_find.py)."""
        cfg = self.config
        if pending > 1:
            accum = {k: v / pending for k, v in accum.items()}
        if self.comm.size > 1:
            accum = self._allreduce_grads(accum)
        if self.scaler is not None:  # the ranks' summed gradients agree, so they skip the same steps
            accum, finite = self.scaler.unscale(accum)
            self.scaler.update(finite)
            if not finite:  # an fp16 overflow: no update this step, and a smaller scale for the next
                self.step += 1
                return
        if cfg.clip_norm is not None:
            norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in accum.values()))
            if norm > cfg.clip_norm:
                scale = np.float32(cfg.clip_norm / (norm + 1e-6))
                accum = {k: v * scale for k, v in accum.items()}
        self.optimizer.step(accum, self.schedule.lr(self.step) if lr is None else lr)
        self.step += 1

    def _check_initial(self, loss: float) -> None:
        self.initial_loss = loss
        classes = int(self.model.classes)
        if self.config.loss != "cross_entropy" or classes < 2:
            self.progress.line(f"initial loss {loss:.4f}")
            return
        self.progress.line(f"initial loss {loss:.4f} (ln {classes} = {math.log(classes):.2f}: a network that knows "
                           f"nothing yet)")
        g = self.model.graph
        logits = g.nodes[self.plan.output]  # the layer whose outputs the loss reads
        source = g.graph.get("source")
        warning = initial_loss_warning(loss, classes, self.config, logits.get("span"),
                                       source.name if source is not None else None)
        if warning is not None:
            self.progress.line(warning.render())


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def write_plot(run_dir: Path, history: list[dict]) -> str:
    """A PNG of loss and accuracy per epoch, or a sentence saying how to get one."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"metrics in {run_dir / METRICS}; for a PNG of the curves: pip install 'cnnc[plot]' (matplotlib)"
    def series(key: str, scale: float = 1.0) -> list[float]:
        return [scale * h[key] if h.get(key) is not None else math.nan for h in history]

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, series("train_loss"), label="train")
    a.plot(epochs, series("test_loss"), label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(epochs, series("train_accuracy", 100), label="train")
    b.plot(epochs, series("test_accuracy", 100), label="test")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy (%)"), b.legend(), b.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_atomic(run_dir / PLOT, lambda f: fig.savefig(f, format="png", dpi=100))
    except CnncError as err:  # the checkpoint and the metrics are written: the picture is not worth failing for
        return f"warning: {err.message}"
    finally:
        plt.close(fig)
    return f"curves: {run_dir / PLOT}"


def result_json(r: TrainResult) -> dict:
    d = asdict(r)
    d.pop("history")
    return d
