"""Checkpoints as `.npz` files without pickle, written atomically, read back with every check.

Arrays are stored under flat names (`param/conv1.weight`, `optim/...`); everything else
(network name and signature, epoch, data cursor, RNG state, history) is one strict-JSON
document stored as a uint8 array under `meta`. Files are written to a temporary name in the
same directory and renamed into place (runtime/files.py), so a crash or a full disk never
leaves half a checkpoint. Reading refuses, with the file and the entry named: a file that is
not an .npz archive (a lone .npy array included), metadata that is not a JSON object, and
parameters that are not finite real floating-point arrays.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from cnnc.dsl.errors import CnncError

from .files import dumps, loads, os_error, write_atomic

META_KEY = "meta"


def write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    payload = dict(arrays)
    payload[META_KEY] = np.frombuffer(dumps(meta).encode("utf-8"), dtype=np.uint8)
    write_atomic(Path(path), lambda f: np.savez(f, **payload))


def read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays without `meta`, the metadata dict) of a file written by `write_npz`."""
    path = Path(path)
    if not path.exists():
        raise CnncError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CnncError(f"{path} is not a file: not a checkpoint")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CnncError(f"{path} is a single .npy array, not a cnnc checkpoint (an .npz archive)",
                            hint="give the checkpoint.npz a run directory holds, or a file written by Model.save")
        with z:
            arrays = {k: z[k] for k in z.files}
    except CnncError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise os_error(exc, "read", path) from None
        raise CnncError(f"{path} is not a readable checkpoint ({exc})") from None
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, KeyError, NotImplementedError) as exc:
        raise CnncError(f"{path} is not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    raw = arrays.pop(META_KEY, None)
    if raw is None:
        raise CnncError(f"{path} is not a cnnc checkpoint (no `{META_KEY}` entry)")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CnncError(f"{path}: its `{META_KEY}` entry is not the metadata cnnc writes")
    meta = loads(raw.tobytes(), f"{path}: its metadata")
    if not isinstance(meta, dict):
        raise CnncError(f"{path}: its metadata is a JSON {type(meta).__name__}, not an object")
    return arrays, meta


def parameters(arrays: dict[str, np.ndarray], path: Path, prefix: str = "param/") -> dict[str, np.ndarray]:
    """The `prefix` entries as float32 arrays; each must be a finite array of real floats."""
    out = {}
    for key, a in arrays.items():
        if not key.startswith(prefix):
            continue
        if a.dtype.kind in "iu":
            raise CnncError(f"{path}: `{key}` holds integers ({a.dtype}), not floating-point numbers")
        if a.dtype.kind != "f":
            raise CnncError(f"{path}: `{key}` holds {a.dtype} values, not real numbers",
                            hint="parameters are float arrays; was the file edited or written by another tool?")
        with np.errstate(all="ignore"):
            a32 = a.astype(np.float32)
        bad = ~np.isfinite(a32)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CnncError(f"{path}: `{key}` holds a value that is not a finite float32 "
                            f"({a.reshape(-1)[i]!r} at flat index {i})",
                            hint="a diverged or damaged checkpoint; resume from an earlier one")
        out[key[len(prefix):]] = a32
    return out
