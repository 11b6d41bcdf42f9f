"""Checkpoints as `.npz` files without pickle, written atomically.

Arrays are stored under flat names (`param/conv1.weight`, `optim/...`, `sched/...`); everything
else (network name and signature, epoch, data cursor, RNG state, history) is one JSON document
stored as a uint8 array under `meta`. Files are written to a temporary name in the same
directory and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from cnnc.dsl.errors import CnncError

META_KEY = "meta"


def write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays)
    payload[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    if not path.exists():
        raise CnncError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise CnncError(f"{path} is not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    raw = arrays.pop(META_KEY, None)
    if raw is None:
        raise CnncError(f"{path} is not a cnnc checkpoint (no `{META_KEY}` entry)")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CnncError(f"{path}: its metadata is corrupt") from None
    return arrays, meta
