"""TensorBoard event files of a training run, next to metrics.jsonl (`cnnc train --tensorboard`).

Written with tensorboardX (the `[tensorboard]` extra, imported only when a run asks for events):
a maintained writer of TensorBoard's event format (protobuf records with CRC-32C framing) that
needs neither TensorFlow nor PyTorch. `tensorboard --logdir runs/` then shows every run.

Scalars, all against the optimizer step (so per-step and per-epoch curves share an axis):
every step `train/step_loss` and `lr` (the rate that step used); at the end of every epoch the
record metrics.jsonl gets: `train/loss`, `train/accuracy`, `test/loss`, `test/accuracy`
(`test/top5` with more than 5 classes), `time/epoch_seconds` and `time/step_ms`. A resumed run
appends a new event file whose first record purges the steps after its checkpoint's (those
logged after the checkpoint by a run that was killed), so no step is shown twice.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from cnnc.dsl.errors import CnncError

INSTALL = "pip install 'cnnc[tensorboard]'"
EPOCH_TAGS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "test_loss": "test/loss",
              "test_accuracy": "test/accuracy", "test_top5": "test/top5", "seconds": "time/epoch_seconds"}


def require() -> None:
    """A CnncError with the pip hint unless tensorboardX can be imported."""
    _summary_writer()


def _summary_writer():
    try:
        with _without_torch():
            from tensorboardX import SummaryWriter
    except ImportError:
        raise CnncError("--tensorboard writes its event files with tensorboardX, which is not installed",
                        hint=INSTALL) from None
    return SummaryWriter


@contextlib.contextmanager
def _without_torch():
    """tensorboardX's writer imports torch when it is installed, only to accept torch tensors: cnnc
    hands it floats, and that import would cost every run seconds. Unless torch is loaded already,
    it is hidden while tensorboardX loads."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        yield
    finally:
        if sys.modules.get("torch") is None:
            del sys.modules["torch"]


class EventWriter:
    """The run's TensorBoard scalars (see the module docstring); `close()` flushes them to disk."""

    def __init__(self, run_dir: Path, first_step: int = 0):
        SummaryWriter = _summary_writer()
        try:
            # a resumed run purges what a killed run logged after its checkpoint: steps from first_step + 1 on.
            # The file is named after the second it was opened: the suffix keeps a run resumed within the
            # same second from overwriting the file before it.
            self.writer = SummaryWriter(logdir=str(run_dir), purge_step=first_step + 1 if first_step else None,
                                        flush_secs=30, filename_suffix=f".from-step-{first_step}")
        except OSError as exc:
            raise CnncError(f"cannot write TensorBoard event files to {run_dir}: {exc.strerror or exc}") from None

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/step_loss", loss, step)
        self.writer.add_scalar("lr", lr, step)

    def epoch(self, record: dict, step: int, steps_in_epoch: int) -> None:
        for key, tag in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        if steps_in_epoch:
            self.writer.add_scalar("time/step_ms", 1000 * record["seconds"] / steps_in_epoch, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
