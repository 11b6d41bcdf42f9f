"""Shared helpers: run the real `cnnc` command line on a .cnn text written to a temporary file."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Kernel choice by timing (backends/tuning.py) is off in tests, so that a test's result does not depend
# on how busy the machine was when a choice was first timed; the tuner's own tests turn it on.
os.environ.setdefault("CNNC_AUTOTUNE", "off")

from cnnc.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only with CNNC_SLOW=1; a faster test covers a bounded sample of the same."""
    if os.environ.get("CNNC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with CNNC_SLOW=1 (CI runs its bounded sample)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def first_error(self) -> tuple[str, int, int, str]:
        """(file, line, col, message) of the first `file:line:col: error: message` line."""
        m = re.search(r"^(.*?):(\d+):(\d+): error: (.*)$", self.err, re.M)
        assert m, f"no located error in stderr:\n{self.err}"
        return m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)

    def errors(self) -> list[tuple[int, int, str]]:
        return [(int(a), int(b), c) for a, b, c in re.findall(r"^.*?:(\d+):(\d+): error: (.*)$", self.err, re.M)]


def run_cli(*args: str) -> Result:
    """Run the command line in this process (fast; used by most tests and by the property test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Result(code, out.getvalue(), err.getvalue())


def run_process(*args: str, cwd: Path = REPO) -> Result:
    """Run `python -m cnnc` as a separate process: the exit code and streams a shell sees."""
    p = subprocess.run([sys.executable, "-m", "cnnc", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def cnn(tmp_path):
    """Write a .cnn text (dedented) to tmp_path and return its path."""
    def write(text: str, name: str = "net.cnn") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path
    return write


def make_data(path, n=96, classes=4, size=8, channels=None, seed=0, label_shift=0):
    """A small learnable image set as .npz: class c lights up one quadrant of noisy images."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(0, 0.3, (n, size, size)).astype(np.float32)
    for c in range(classes):
        r, q = divmod(c, 2)
        x[y == c, r * size // 2:(r + 1) * size // 2, q * size // 2:(q + 1) * size // 2] += 1.0
    x = np.clip((x + 1) * 100, 0, 255).astype(np.uint8)
    if channels:
        x = np.repeat(x[:, None], channels, axis=1)
    np.savez(path, x=x, y=(y + label_shift).astype(np.int64))
    return path


def tiny_net(optimizer: str = "momentum momentum=0.9", lr: str = "0.05 policy=plateau patience=1",
             epochs: int = 2, seed: int = 3) -> str:
    """A small trainable network for 1×8×8 images of 4 classes (see make_data), with a train section."""
    return (f"network tiny\ninput 1x8x8\nclasses 4\nlayers:\n"
            f"    conv 4 3x3 pad=1 -> bn -> relu -> maxpool 2x2 -> gap -> dense classes\n"
            f"train:\n    optimizer {optimizer}\n    lr {lr}\n    batch 16\n    epochs {epochs}\n    seed {seed}\n")


@pytest.fixture
def two_threads():
    """The NumPy backend on two threads of its own and OpenBLAS on one (its default split), restored
    after; skipped where OpenBLAS's thread count cannot be set."""
    from cnnc.backends.numpy import blas, parallel

    if blas.get_threads() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose thread count can be set")
    threads, blas_threads = parallel.get_threads(), blas.get_threads()
    parallel.set_threads(2)
    blas.set_threads(1)
    yield
    parallel.set_threads(threads)
    blas.set_threads(blas_threads)
