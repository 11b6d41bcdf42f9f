"""The Python API, mirroring the command line.

    import cnnc.runtime.api as cnnc
    model = cnnc.load("examples/lenet5.cnn")               # check + compile for NumPy
    result = cnnc.train("examples/lenet5.cnn", epochs=3)   # like `cnnc train`
    loss, acc, confusion = cnnc.evaluate("examples/lenet5.cnn", result.run_dir + "/checkpoint.npz")

Training settings come from the `.cnn` file's `train:` section; keyword overrides (the
command line's flags) are validated like the file's own settings. Before anything large is
allocated the memory it will take is estimated and checked (runtime/budget.py).

A run directory holds run.json (which .cnn file, its settings, where its data was found),
checkpoint.npz, metrics.jsonl and curves.png. `--resume` continues from the checkpoint, or
starts from the beginning with run.json's settings when the run stopped before its first one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from cnnc.backends.base import backend_class
from cnnc.compiler.pipeline import check
from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import CnncError

from .budget import Estimate, run_estimate
from .checkpoint import parameters, read_npz
from .data import Dataset, check_compatible, load_dataset
from .files import RunLock, dumps, field_error, read_json, write_text_atomic
from .model import Model
from .optim import state_arrays
from .schedules import depends_on_length
from .transforms import settings_in_use
from .train import CHECKPOINT, Trainer, TrainResult, evaluate_data, write_plot

RUN_INFO = "run.json"


def load(path: str | os.PathLike, backend: str = "numpy", seed: int | None = None) -> Model:
    return Model.load(path, backend, seed)


def with_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return TrainConfig(**{**config.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        flag = f"--{name.replace('_', '-')}" if name in overrides else (name or "train settings")
        msg = err["msg"].removeprefix("Value error, ").split(", got ")[0]
        got = f", got {overrides[name]}" if name in overrides else ""
        raise CnncError(f"{flag}: {msg[0].lower() + msg[1:]}{got}") from None


def load_data(spec: str, model: Model, config: TrainConfig, base_dir: Path | None,
              workers: int | None = None) -> tuple[Dataset, list[str]]:
    """The dataset `spec` names, fitted to the network's input (28×28 digits are padded to 32×32)."""
    return _load_data(spec, tuple(model.input_shape), model.classes, config, base_dir, workers)


def _load_data(spec: str, want: tuple, classes, config: TrainConfig, base_dir: Path | None,
               workers: int | None = None):
    notes = []
    prefix, sep, rest = spec.strip().partition(":")
    if sep and prefix == "imagefolder":  # streamed: only the file index is loaded here
        from .data import _resolve
        from .images import load_streamed
        base = base_dir if base_dir is not None else Path.cwd()
        target = _resolve(rest, base, spec, want_dir=False) if rest.strip().endswith(".txt") else \
            _resolve(rest, base, spec, want_dir=True)
        ds = load_streamed(spec, target, want, classes, config, workers)
        Estimate(f"streaming `{spec}` at batch {config.batch}",
                 [(f"{ds.pool.slots} prefetched batches", ds.pool.ring_bytes)]).check(
            "a smaller batch or fewer --workers")
        notes.append(f"streaming {len(ds.train_y)} + {len(ds.test_y)} images with {ds.pool.workers} worker "
                     f"process(es), {ds.pool.slots} batches prefetched")
        return ds, notes
    used = settings_in_use(config)
    if used:  # arrays arrive at their final size: resizing, cropping and colour noise would be silently skipped
        raise CnncError(f"data `{spec}` is read as arrays, which the image transforms "
                        f"({', '.join(used)}) do not apply to",
                        hint="read image files with `data \"imagefolder:DIR\"`; on arrays, `crop N pad`, `flip` "
                             "and `normalize` work")
    raw = load_dataset(spec, base_dir, normalize=False, seed=config.seed)
    have = tuple(raw.image_shape)
    pad_to = None
    if len(want) == 3 and have != want and have[0] == want[0] and all(
            w >= h and (w - h) % 2 == 0 for h, w in zip(have[1:], want[1:])):
        pad_to = want[1:]
        notes.append(f"padding {have[1]}×{have[2]} images to {want[1]}×{want[2]} (the network's input)")
    if pad_to is None and config.normalize is False:
        ds = raw  # the same data: no second load
    else:
        del raw
        ds = load_dataset(spec, base_dir, pad_to=pad_to, normalize=config.normalize, seed=config.seed)
    check_compatible(ds, want, classes)
    return ds, notes


class RunInfo(BaseModel):
    """run.json: what a run trains and with which settings, checked when a run is resumed."""

    model_config = ConfigDict(extra="forbid")
    cnn: str
    config: dict
    base_dir: str | None = None
    weights: str | None = None  # the weights file the run started from (`cnnc train --weights`)


def read_run_info(run: Path) -> tuple[RunInfo, TrainConfig]:
    path = run / RUN_INFO
    raw = read_json(path, "run description (run.json)")
    if not isinstance(raw, dict):
        raise CnncError(f"{path} holds a JSON {type(raw).__name__}, not the object cnnc train writes")
    try:
        info = RunInfo(**raw)
    except ValidationError as exc:
        raise field_error(path, exc) from None
    try:
        config = TrainConfig(**info.config)
    except ValidationError as exc:
        raise field_error(path, exc, "config.") from None
    return info, config


def safe_name(name: str) -> str:
    """A network name made fit to be one directory name under runs/: no separators, no `..`."""
    cleaned = re.sub(r"[^A-Za-z0-9_.+-]", "_", name).lstrip(".")
    return cleaned[:100] or "network"


def _fresh_run_dir(name: str, root: Path = Path("runs")) -> Path:
    name = safe_name(name)
    base = root / name
    if not base.exists():
        return base
    i = 2
    while (root / f"{name}-{i}").exists():
        i += 1
    return root / f"{name}-{i}"


def prepare(path: str | os.PathLike | None = None, *, run_dir: str | os.PathLike | None = None,
            resume: str | os.PathLike | None = None, data: str | None = None, backend: str = "numpy",
            progress: bool = True, stream=None, weights: str | os.PathLike | None = None,
            workers: int | None = None, opt_level: int = 2, tensorboard: bool = False,
            **overrides) -> tuple[Trainer, list[str]]:
    """Everything `cnnc train` does before the first batch; nothing is written yet. `weights`: start
    from these weights (a checkpoint or a file Model.save or `cnnc weights import` wrote). `opt_level`:
    the training plan's (2: the fused plan, the same gradients as 0, the plain plan). `tensorboard`:
    also write TensorBoard event files (as the train setting `tensorboard` does)."""
    import sys
    stream = stream or sys.stderr
    info = saved = None
    resume_from = None  # the checkpoint to continue from; None for a start from the beginning
    notes: list[str] = []
    if resume is not None:
        if weights is not None:
            raise CnncError("a resumed run continues from its own checkpoint; --weights starts a new run",
                            hint="give --weights without --resume")
        run = Path(resume)
        if not run.is_dir():
            raise CnncError(f"nothing to resume: {run} is not a run directory")
        if not (run / RUN_INFO).exists():
            if (run / CHECKPOINT).exists():
                raise CnncError(f"{run / RUN_INFO} is missing; cannot tell which network this run trains")
            raise CnncError(f"nothing to resume in {run}: no {RUN_INFO} and no {CHECKPOINT}",
                            hint="start a run with `cnnc train FILE -o DIR`")
        info, saved = read_run_info(run)
        if (run / CHECKPOINT).exists():
            resume_from = run / CHECKPOINT
        else:
            notes.append(f"{run} has no checkpoint yet: starting from the beginning with its settings")
        path = path or info.cnn
        run_dir = run
    if path is None:
        raise CnncError("which .cnn file? give FILE, or --resume RUN_DIR")
    graph = check(path)
    name = graph.graph["network"]
    base_config = saved if saved is not None else (graph.graph.get("train") or TrainConfig())
    if info is not None:
        changed = {k for k, v in overrides.items() if v is not None and k != "epochs"}
        if changed or data is not None:
            raise CnncError("a resumed run keeps its settings; only --epochs may change",
                            hint=f"start a new run to change {', '.join(sorted(changed)) or '--data'}")
    config = with_overrides(base_config, {**overrides, "data": data})
    if resume_from is not None and config.epochs != base_config.epochs and depends_on_length(base_config):
        raise CnncError(f"policy {base_config.policy} shapes the learning rate over the whole run's "
                        f"{base_config.epochs} epochs; resuming with --epochs {config.epochs} would change the rates "
                        "of epochs already trained, so the result would match no single run",
                        hint=f"resume without --epochs, or start a new run with --epochs {config.epochs}")
    if info is None:
        base_dir = Path(path).resolve().parent if data is None else None
    else:
        base_dir = Path(info.base_dir) if info.base_dir else None
    input_shape = tuple(graph.nodes[graph.graph["input"]]["shape"])
    classes = graph.graph.get("classes") or graph.nodes[graph.graph["output"]]["shape"][0]
    run_estimate(graph, f"training `{name}` at batch {config.batch}", config.batch, training=True,
                 optimizer_arrays=state_arrays(config), optimizer=config.optimizer).check(
        "a smaller batch (--batch), fewer filters or units, or an optimizer that keeps less state")
    dataset, data_notes = _load_data(config.data, input_shape, classes, config, base_dir, workers)
    notes += data_notes
    notes += lint_notes(graph, config, overrides, data, backend, len(dataset.train_y))
    if getattr(dataset, "streamed", False):  # measured transform statistics travel in run.json and the checkpoint
        config = dataset.config
    backend_class(backend).check_precision(config.precision, str(path))  # before a device is started
    model = Model(graph, backend, config.seed, str(path))
    model.config = config
    if info is not None and resume_from is None and info.weights:  # starting over: from the same weights
        weights = info.weights
    if weights is not None:
        from .weights import load_checkpoint_into
        load_checkpoint_into(model, weights)
        notes.append(f"starting from the weights in {weights}")
    from .distributed import world
    comm = world()
    if run_dir is None:  # under mpiexec rank 0 chooses, so that the ranks share one directory
        run_dir = comm.bcast(str(_fresh_run_dir(model.name)) if comm.rank == 0 else None)
    run_dir = Path(run_dir)
    if info is None and run_dir.exists() and not run_dir.is_dir():
        raise CnncError(f"{run_dir} exists and is not a directory", hint="choose another -o")
    if info is None and run_dir.exists() and any(run_dir.iterdir()):
        raise CnncError(f"run directory {run_dir} exists and is not empty",
                        hint=f"continue it with --resume {run_dir}, or choose another -o")
    trainer = Trainer(model, dataset, config, run_dir, progress=progress, stream=stream, opt_level=opt_level)
    if tensorboard or config.tensorboard:
        from .tensorboard import require
        require()  # a missing extra is an error now, before any file is written
        trainer.tensorboard = True
    if resume_from is not None:
        trainer.restore(resume_from)
        if trainer.epoch > config.epochs:
            raise CnncError(f"{run_dir} has trained {trainer.epoch} epochs already; --epochs {config.epochs} "
                            "would not continue it", hint=f"give --epochs {trainer.epoch + 1} or more")
    if info is None:
        trainer.pending_info = {"cnn": str(Path(path).resolve()), "config": config.model_dump(mode="json"),
                                "base_dir": str(base_dir) if base_dir else None,
                                "weights": str(Path(weights).resolve()) if weights is not None else None}
    elif config.epochs != saved.epochs:  # run.json follows the run's length
        trainer.pending_info = {**info.model_dump(), "config": config.model_dump(mode="json")}
    comm.barrier("the start barrier")  # every rank has checked the run directory before rank 0 writes in it
    return trainer, notes


def lint_notes(graph, config: TrainConfig, overrides: dict, data: str | None, backend: str,
               train_size: int) -> list[str]:
    """The training lint's warnings (compiler/lint.py) for this run, rendered: the settings as
    overridden (a flag's value has no span in the file), the backend and the training set known."""
    from cnnc.compiler.lint import lint_training
    flags = {k for k, v in {**overrides, "data": data}.items() if v is not None}
    spans = {k: v for k, v in (graph.graph.get("train_spans") or {}).items() if k not in flags}
    return [w.render() for w in lint_training(graph, config, spans, backend=backend, train_size=train_size)]


def train(path: str | os.PathLike | None = None, **kwargs) -> TrainResult:
    trainer, notes = prepare(path, **kwargs)
    for note in notes:
        trainer.progress.line(note)
    return run(trainer)


def run(trainer: Trainer) -> TrainResult:
    if trainer.comm.rank:  # under mpiexec rank 0 holds the lock and writes the files
        return trainer.run()
    with RunLock(trainer.run_dir):
        info = trainer.pending_info
        if info is not None:
            write_text_atomic(trainer.run_dir / RUN_INFO, dumps(info, indent=1))
        if trainer.history or trainer.cursor:  # a resumed run: its metrics are its checkpoint's history
            trainer.write_metrics()
        result = trainer.run()
    if result.history:
        trainer.progress.line(write_plot(trainer.run_dir, trainer.history))
    return result


def evaluate(path: str | os.PathLike, checkpoint: str | os.PathLike, data: str | None = None,
             backend: str = "numpy", workers: int | None = None):
    """Loss, accuracy and confusion matrix of a checkpoint on the test split of the data: an
    Evaluation (train.py), which unpacks as (loss, accuracy, confusion) and has `top5` too."""
    model = Model.load(path, backend)
    checkpoint = Path(checkpoint)
    arrays, meta = read_npz(checkpoint)
    if meta.get("network") != model.name or meta.get("signature") not in (None, model.signature()):
        raise CnncError(f"{checkpoint} holds weights of network `{meta.get('network')}`, not `{model.name}`")
    model.set_params(parameters(arrays, checkpoint), str(checkpoint))
    config = model.config
    if meta.get("config") is not None:
        if not isinstance(meta["config"], dict):
            raise CnncError(f"{checkpoint}: field `config` of its metadata is not an object")
        try:
            config = TrainConfig(**meta["config"])
        except ValidationError as exc:
            raise field_error(checkpoint, exc, "config.", " of its metadata") from None
    base_dir = Path(path).resolve().parent if data is None else None
    dataset, _ = load_data(data or config.data, model, config, base_dir, workers)
    batch = config.batch if getattr(dataset, "streamed", False) else min(500, max(config.batch, 1))
    run_estimate(model.graph, f"evaluating `{model.name}` at batch {batch}", batch).check("a smaller batch")
    try:
        return evaluate_data(model, dataset, batch=batch, loss_name=config.loss)
    finally:
        if getattr(dataset, "streamed", False):
            dataset.close()
