"""Run directories side by side (`cnnc runs DIR...`, and the end of `cnnc train --sweep`).

Each run's `metrics.jsonl` (one record per epoch, as runtime/train.py writes it) is read back and
checked line by line; a damaged line is refused naming the file, the line and the field. The
table gives each run's epochs, final train and test loss, final test accuracy (and the best one)
and its training time (the sum of the epochs' `seconds`); the figure overlays the runs' loss and
accuracy curves, one colour per run, test solid and train dashed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from cnnc.dsl.errors import CnncError

from .files import field_error, loads, read_written, write_atomic
from .train import METRICS, EpochRecord

MAX_METRICS_BYTES = 64 << 20


@dataclass
class Run:
    name: str
    path: str
    history: list[dict] = field(default_factory=list)
    status: str = "done"  # or why the run stopped (a sweep's failed run)

    def last(self, key: str) -> float | None:
        return self.history[-1].get(key) if self.history else None

    def best_accuracy(self) -> float | None:
        values = [h["test_accuracy"] for h in self.history if h.get("test_accuracy") is not None]
        return max(values) if values else None

    def seconds(self) -> float:
        return float(sum(h.get("seconds") or 0.0 for h in self.history))

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "epochs": len(self.history), "status": self.status,
                "train_loss": self.last("train_loss"), "test_loss": self.last("test_loss"),
                "test_accuracy": self.last("test_accuracy"), "best_test_accuracy": self.best_accuracy(),
                "seconds": self.seconds(), "history": self.history}


def read_run(directory, name: str | None = None, status: str = "done") -> Run:
    """A run directory's metrics, checked record by record."""
    directory = Path(directory)
    path = directory / METRICS
    if not directory.is_dir():
        raise CnncError(f"{directory} is not a run directory" + (": it does not exist" if not directory.exists()
                                                                  else ""))
    data = read_written(path, "the metrics cnnc train writes", MAX_METRICS_BYTES,
                        missing=f"{directory} has no {METRICS}: not a run directory of cnnc train, or a run "
                                "stopped before its first epoch")
    history = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = loads(line, where)
        if not isinstance(record, dict):
            raise CnncError(f"{where} holds a JSON {type(record).__name__}, not an epoch's record")
        try:
            EpochRecord(**record)
        except ValidationError as exc:
            raise field_error(Path(where), exc) from None
        if record["epoch"] != len(history) + 1:
            raise CnncError(f"{where}: epoch {record['epoch']} follows {len(history)} epochs",
                            hint="the file was damaged or edited; restore it, or start again")
        history.append(record)
    return Run(name or directory.name, str(directory), history, status)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4f}"


def table(runs: list[Run]) -> str:
    """One row per run: epochs, final train/test loss, final and best test accuracy, training time."""
    width = max([len("run")] + [len(r.name) for r in runs])
    head = (f"{'run':<{width}}  {'epochs':>6}  {'train loss':>10}  {'test loss':>10}  {'test acc':>9}  "
            f"{'best acc':>9}  {'time':>8}")
    rows = [head, "-" * len(head)]
    for r in runs:
        row = (f"{r.name:<{width}}  {len(r.history):>6}  {_num(r.last('train_loss')):>10}  "
               f"{_num(r.last('test_loss')):>10}  {_pct(r.last('test_accuracy')):>9}  {_pct(r.best_accuracy()):>9}  "
               f"{r.seconds():>7.1f}s")
        rows.append(row + ("" if r.status == "done" else f"  {r.status}"))
    return "\n".join(rows)


def check_plot_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise CnncError(f"{path}: the figure is written as .png, .svg or .pdf")
    return path


def write_plot(runs: list[Run], path) -> str:
    """Loss and accuracy per epoch of every run in one figure, or a sentence saying how to get one."""
    path = check_plot_path(path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "for a figure of the curves: pip install 'cnnc[plot]' (matplotlib)"
    from matplotlib.lines import Line2D

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(runs):
        colour = f"C{i % 10}"
        epochs = [h["epoch"] for h in r.history]

        def series(key, scale=1.0):
            return [scale * h[key] if h.get(key) is not None else math.nan for h in r.history]
        a.plot(epochs, series("test_loss"), color=colour, lw=1.8, label=r.name)
        a.plot(epochs, series("train_loss"), color=colour, lw=1.2, ls="--")
        b.plot(epochs, series("test_accuracy", 100), color=colour, lw=1.8, label=r.name)
        b.plot(epochs, series("train_accuracy", 100), color=colour, lw=1.2, ls="--")
    styles = [Line2D([], [], color="0.3", lw=1.8, label="test"), Line2D([], [], color="0.3", lw=1.2, ls="--",
                                                                         label="train")]
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.grid(alpha=0.3)
    losses = [h.get(k) for r in runs for h in r.history for k in ("train_loss", "test_loss")]
    if losses and all(v is not None and v > 0 for v in losses):  # losses span decades: a log axis shows them all
        a.set_yscale("log")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy (%)"), b.grid(alpha=0.3)
    a.legend(fontsize=8, title="run")
    b.legend(handles=styles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fmt = path.suffix.lower()[1:]
    try:
        write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=90))
    finally:
        plt.close(fig)
    return f"figure: {path}"
