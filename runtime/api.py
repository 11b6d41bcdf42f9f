"""The Python API, mirroring the command line.

    import cnnc.runtime.api as cnnc
    model = cnnc.load("examples/lenet5.cnn")               # check + compile for NumPy
    result = cnnc.train("examples/lenet5.cnn", epochs=3)   # like `cnnc train`
    loss, acc, confusion = cnnc.evaluate("examples/lenet5.cnn", result.run_dir + "/checkpoint.npz")

Training settings come from the `.cnn` file's `train:` section; keyword overrides (the
command line's flags) are validated like the file's own settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import CnncError

from .checkpoint import read_npz
from .data import Dataset, check_compatible, load_dataset
from .model import Model
from .train import CHECKPOINT, Trainer, TrainResult, evaluate as _evaluate, write_plot

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


def load_data(spec: str, model: Model, config: TrainConfig, base_dir: Path | None) -> tuple[Dataset, list[str]]:
    """The dataset `spec` names, fitted to the network's input (28×28 digits are padded to 32×32)."""
    notes = []
    want = tuple(model.input_shape)
    raw = load_dataset(spec, base_dir, normalize=False, seed=config.seed)
    have = tuple(raw.image_shape)
    pad_to = None
    if len(want) == 3 and have != want and have[0] == want[0] and all(
            w >= h and (w - h) % 2 == 0 for h, w in zip(have[1:], want[1:])):
        pad_to = want[1:]
        notes.append(f"padding {have[1]}×{have[2]} images to {want[1]}×{want[2]} (the network's input)")
    ds = load_dataset(spec, base_dir, pad_to=pad_to, normalize=config.normalize, seed=config.seed)
    check_compatible(ds, want, model.classes)
    return ds, notes


def _fresh_run_dir(name: str) -> Path:
    base = Path("runs") / name
    if not base.exists():
        return base
    i = 2
    while (base.parent / f"{name}-{i}").exists():
        i += 1
    return base.parent / f"{name}-{i}"


def prepare(path: str | os.PathLike | None = None, *, run_dir: str | os.PathLike | None = None,
            resume: str | os.PathLike | None = None, data: str | None = None, backend: str = "numpy",
            progress: bool = True, stream=None, **overrides) -> tuple[Trainer, list[str]]:
    """Everything `cnnc train` does before the first batch; nothing is written yet."""
    import sys
    stream = stream or sys.stderr
    info = None
    if resume is not None:
        run = Path(resume)
        if not (run / CHECKPOINT).exists():
            raise CnncError(f"nothing to resume in {run}: no {CHECKPOINT}")
        try:
            info = json.loads((run / RUN_INFO).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise CnncError(f"{run / RUN_INFO} is missing or corrupt; cannot tell which network this run trains") \
                from None
        path = path or info["cnn"]
        run_dir = run
    if path is None:
        raise CnncError("which .cnn file? give FILE, or --resume RUN_DIR")
    model = Model.load(path, backend)
    base_config = model.config if info is None else TrainConfig(**info["config"])
    if info is not None:
        changed = {k for k, v in overrides.items() if v is not None and k != "epochs"}
        if changed or data is not None:
            raise CnncError("a resumed run keeps its settings; only --epochs may change",
                            hint=f"start a new run to change {', '.join(sorted(changed)) or '--data'}")
    config = with_overrides(base_config, {**overrides, "data": data})
    model.config = config
    if info is None:  # a fresh start draws its weights from the (possibly overridden) seed
        model = Model(model.graph, backend, config.seed, str(path))
        model.config = config
    base_dir = Path(path).resolve().parent if data is None and info is None else None
    if info is not None:
        base_dir = Path(info["base_dir"]) if info.get("base_dir") else None
    dataset, notes = load_data(config.data, model, config, base_dir)
    if run_dir is None:
        run_dir = _fresh_run_dir(model.name)
    run_dir = Path(run_dir)
    if info is None and run_dir.exists() and any(run_dir.iterdir()):
        raise CnncError(f"run directory {run_dir} exists and is not empty",
                        hint=f"continue it with --resume {run_dir}, or choose another -o")
    trainer = Trainer(model, dataset, config, run_dir, progress=progress, stream=stream)
    if info is not None:
        trainer.restore(run_dir / CHECKPOINT)
    else:
        trainer.pending_info = {"cnn": str(Path(path).resolve()), "config": config.model_dump(mode="json"),
                                "base_dir": str(base_dir) if base_dir else None}
    return trainer, notes


def train(path: str | os.PathLike | None = None, **kwargs) -> TrainResult:
    trainer, notes = prepare(path, **kwargs)
    for note in notes:
        trainer.progress.line(note)
    return run(trainer)


def run(trainer: Trainer) -> TrainResult:
    info = trainer.pending_info
    if info is not None:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        (trainer.run_dir / RUN_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    result = trainer.run()
    if result.history:
        trainer.progress.line(write_plot(trainer.run_dir, trainer.history))
    return result


def evaluate(path: str | os.PathLike, checkpoint: str | os.PathLike, data: str | None = None,
             backend: str = "numpy"):
    """Loss, accuracy and confusion matrix of a checkpoint on the test split of the data."""
    model = Model.load(path, backend)
    arrays, meta = read_npz(Path(checkpoint))
    if meta.get("network") != model.name or meta.get("signature") not in (None, model.signature()):
        raise CnncError(f"{checkpoint} holds weights of network `{meta.get('network')}`, not `{model.name}`")
    model.set_params({k[6:]: v for k, v in arrays.items() if k.startswith("param/")}, str(checkpoint))
    config = model.config
    if meta.get("config"):
        config = TrainConfig(**meta["config"])
    base_dir = Path(path).resolve().parent if data is None else None
    dataset, _ = load_data(data or config.data, model, config, base_dir)
    return _evaluate(model, dataset.test_x, dataset.test_y, loss_name=config.loss)
