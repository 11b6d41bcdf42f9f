"""The files cnnc writes and reads back: atomic writes, strict JSON, clear errors, one owner per run.

- `write_atomic` writes to a temporary file in the same directory and renames it into place:
  a crash or a full disk leaves the previous file whole. Any OSError becomes a CnncError that
  says what could not be written, where, why, and that the previous file is intact.
- JSON is written strictly (no NaN or Infinity, which other readers refuse): non-finite
  numbers become null. `read_json` reads a bounded regular file and turns every way it can be
  damaged (not UTF-8, not JSON, nested too deep) into a CnncError naming the file.
- `RunLock` holds a run directory for one training process; holding it, leftovers of an
  earlier process killed during a write (`.NAME.*.tmp`) are removed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

from cnnc.dsl.errors import CnncError
from cnnc.dsl.loader import NotARegularFile, read_regular_file

MAX_JSON_BYTES = 64 << 20  # run.json, plan.json, checkpoint metadata
LOCK = ".lock"


def os_error(exc: OSError, action: str, path: Path, intact: bool = False) -> CnncError:
    """A CnncError for a failed read or write, with the system's reason."""
    reason = exc.strerror or exc.__class__.__name__
    hint = None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space (or choose another directory) and run the command again"
    msg = f"could not {action} {path}: {reason}"
    if intact:
        msg += f"; the previous {path.name} is intact"
    return CnncError(msg, hint=hint)


def write_atomic(path: Path, write: Callable, what: str | None = None) -> None:
    """Call `write(f)` on a temporary binary file beside `path`, then rename it over `path`."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise os_error(exc, "write", path, existed) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise os_error(exc, "write", path, existed) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def finite(obj):
    """`obj` with every non-finite float replaced by None, so that it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes, where: str):
    """Strict JSON from text; a CnncError naming `where` for anything else."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise CnncError(f"{where} is nested too deeply to be a file cnnc wrote") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CnncError(f"{where} is not valid JSON: {exc}") from None


def read_written(path: Path, what: str, max_bytes: int, missing: str | None = None) -> bytes:
    """The bytes of a file that cnnc wrote (`what`: "a checkpoint", "the metrics cnnc train writes"),
    with every failure as a CnncError naming it; `missing` replaces the message for an absent file."""
    path = Path(path)
    try:
        data = read_regular_file(path, max_bytes)
    except FileNotFoundError:
        raise CnncError(missing or f"{path} is missing: no {what.removeprefix('a ')}") from None
    except NotARegularFile as exc:
        raise CnncError(f"{path} is {exc.kind}: not {what}") from None
    except OSError as exc:
        raise os_error(exc, "read", path) from None
    if len(data) > max_bytes:
        raise CnncError(f"{path} is larger than {max_bytes >> 20} MiB: not {what}")
    return data


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES):
    """A JSON file that cnnc wrote, read back with every failure as a CnncError naming it."""
    return loads(read_written(path, f"a {what}", max_bytes), str(path))


def field_error(path: Path, exc, prefix: str = "", of: str = "") -> CnncError:
    """A pydantic ValidationError on a file cnnc wrote, as a CnncError naming the file and the
    field (`prefix` is prepended to the field's path; `of` says where the field is)."""
    err = exc.errors()[0]
    where = prefix + ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return CnncError(f"{path}: field `{where}`{of}: {msg[0].lower() + msg[1:]}",
                     hint="the file was damaged or edited; restore it, or start again")


class RunLock:
    """An exclusive lock on a run directory while one process trains in it (flock: released by
    the kernel when the process dies, so a killed run never leaves the directory locked)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(exc, "create the run directory", self.run_dir) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise CnncError(f"run directory {self.run_dir} is in use by another cnnc process",
                            hint="wait for it to finish, or train into another directory with -o") from None
        remove_stale_temporaries(self.run_dir)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete `.NAME.*.tmp` files left by a process killed while writing (call where no other
    process writes: holding the run's lock, or before compiling into a directory)."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        try:
            if p.is_file():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed
