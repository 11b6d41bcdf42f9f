"""The system C compiler for the NumPy backend's generated kernels (direct.py, cdepthwise.py,
cpool.py, cthreads.py): a source built once into a shared library, cached by content hash.

Sources are compiled with `cc -O3 -march=native` (CC chooses another compiler) into a library
named by a hash of the text, the flags, the CPU model (-march=native code is this machine's) and
the compiler, under `~/.cache/cnnc/c`. Where the compiler is missing or fails, `available()` turns
false for the process (saying why once: `give_up`) and the kernels' NumPy paths run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from . import jit, parallel


class BuildError(RuntimeError):
    """The C compiler failed on a generated kernel (or could not run): the compiled kernels are
    then off for the process and the NumPy ones compute instead."""


_broken: str | None = None  # why the compiler failed, once it has


def available() -> bool:
    """A C compiler is on the PATH ($CC, else cc), it has not failed in this process, and CNNC_JIT
    is not 0."""
    return jit.allowed() and _broken is None and _compiler() is not None


def give_up(err: BuildError) -> None:
    """Turn the compiled kernels off for this process, saying why once."""
    global _broken
    if _broken is None:
        _broken = str(err)
        print(f"cnnc: {err}; the NumPy kernels run instead", file=sys.stderr)


@lru_cache(maxsize=1)
def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


def _cache_dir() -> Path:
    return jit.cache_root() / "c"


FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC"]
# for kernels whose values must be NumPy's to the bit: a*b + c stays two roundings, no fused multiply-add
EXACT_FLAGS = ("-ffp-contract=off",)


def build(source: str, flags: tuple[str, ...] = ()) -> Path:
    """The shared library of C `source`, compiled once per text, compiler flags (FLAGS, then
    `flags`) and CPU (cached by that hash under the cache root; raises BuildError where the
    compiler fails)."""
    every = [*FLAGS, *flags]
    key = "\n".join([source, " ".join(every), parallel.cpu_model(), _compiler() or ""])
    name = f"cnnc_direct_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    folder = _cache_dir()
    lib = folder / f"{name}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f".{name}.{os.getpid()}.c"
    tmp = folder / f".{name}.{os.getpid()}.so"
    src.write_text(source, encoding="utf-8")
    try:
        try:
            r = subprocess.run([_compiler(), *every, "-o", str(tmp), str(src)], capture_output=True, text=True,
                               timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BuildError(f"the C compiler {_compiler()} could not build a generated kernel: {e}") from e
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise BuildError(f"the C compiler {_compiler()} failed on a generated kernel: {last}")
        os.replace(tmp, lib)  # atomic: another process may be building the same library
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return lib


def load(defines: dict, source: str, what: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The library of `source` after a #define line per entry of `defines`, built (`build`, with
    the extra compiler `flags`) and
    loaded; BuildError where the compiler fails or the loader refuses the file (another machine's
    cache, a broken file), naming `what` ("the pooling kernels")."""
    text = "".join(f"#define {key} {value}\n" for key, value in defines.items()) + source
    try:
        return ctypes.CDLL(str(build(text, tuple(flags))))
    except OSError as e:
        raise BuildError(f"{what} did not load: {e}") from e
