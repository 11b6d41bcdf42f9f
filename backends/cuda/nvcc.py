"""Compile generated kernel sources for sm_90 with nvcc, on a machine with or without a GPU.

`compile_cubin(source, out)` runs `nvcc -cubin -arch=sm_90 -O3 -Xptxas -v` and parses ptxas's
report into per-kernel resource usage: registers, shared memory, stack frame and spill bytes,
which `cnnc compile --backend cuda --report` prints.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from cnnc.dsl.errors import CnncError

ARCH = "sm_90"
# no --use_fast_math: its approximate tanh/exp would miss the 1e-5 agreement with the NumPy reference
FLAGS = ["-cubin", f"-arch={ARCH}", "-O3", "-std=c++17", "-Xptxas", "-v"]


@dataclass
class Resources:
    kernel: str
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return None


def compile_cubin(source: str, out: Path, jobs: int | None = None) -> list[Resources]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise CnncError("the CUDA backend needs nvcc to compile its kernels ahead of time",
                        hint="install the CUDA toolkit (nvcc 12.8 or newer for sm_90) or set CUDA_HOME")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / (out.stem + ".cu")
        cu.write_text(source, encoding="utf-8")
        cmd = [nvcc, *FLAGS, "-o", str(out), str(cu)]
        if jobs:
            cmd[1:1] = ["--threads", str(jobs)]
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        errors = "\n".join(line for line in p.stderr.splitlines() if "error" in line)[:2000]
        raise CnncError(f"nvcc failed to compile the generated kernels:\n{errors or p.stderr[-2000:]}")
    return parse_ptxas(p.stderr)


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str) -> list[Resources]:
    """ptxas -v output → one Resources per kernel entry."""
    out: list[Resources] = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            out.append(Resources(m.group(1)))
        elif out and (m := _STACK.search(line)):
            out[-1].stack_bytes, out[-1].spill_stores, out[-1].spill_loads = map(int, m.groups())
        elif out and (m := _USED.search(line)):
            out[-1].registers = int(m.group(1))
            out[-1].shared_bytes = int(m.group(2) or 0)
    return out


def compile_specs(specs, folder: Path, chunks: int | None = None) -> list[Resources]:
    """Compile kernel specs for sm_90 in parallel nvcc processes, one translation unit per chunk
    (written into `folder`), and return ptxas's report of every kernel. One nvcc process uses one
    core; a few hundred specialisations split over the cores take a fraction of its time."""
    from concurrent.futures import ThreadPoolExecutor

    from .source import translation_unit

    unique = sorted({s.key: s for s in specs}.values(), key=lambda s: s.key)
    n = max(1, min(chunks or len(os.sched_getaffinity(0)), len(unique)))
    groups = [unique[i::n] for i in range(n)]
    folder = Path(folder)
    with ThreadPoolExecutor(n) as pool:
        reports = list(pool.map(lambda ig: compile_cubin(translation_unit(ig[1]), folder / f"part{ig[0]}.cubin"),
                                enumerate(groups)))
    return [r for report in reports for r in report]


def cache_dir() -> Path:
    """Where compiled cubins are kept between runs ($CNNC_CACHE_DIR, else ~/.cache/cnnc)."""
    root = os.environ.get("CNNC_CACHE_DIR") or Path.home() / ".cache" / "cnnc"
    return Path(root) / "cubin"


def build_cubins(specs, chunks: int | None = None) -> list[tuple[list[str], Path]]:
    """Compile many kernel specs for sm_90 in parallel nvcc processes, one cubin per chunk of
    specs, each cached on disk under the hash of its source and flags; returns (spec keys, cubin
    path) per chunk. A plan's few hundred specialisations take minutes one at a time through
    NVRTC; split over the cores they take seconds, and a second run finds them cached."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from .source import translation_unit

    unique = sorted({s.key: s for s in specs}.values(), key=lambda s: s.key)
    if not unique:
        return []
    n = max(1, min(chunks or os.cpu_count() or 1, len(unique)))
    groups = [unique[i::n] for i in range(n)]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)

    def build(group) -> Path:
        source = translation_unit(group)
        digest = hashlib.sha256("\n".join([*FLAGS, source]).encode()).hexdigest()[:32]
        path = folder / f"{digest}.cubin"
        if not path.exists():
            tmp = folder / f"{digest}.{os.getpid()}.tmp.cubin"
            compile_cubin(source, tmp)
            os.replace(tmp, path)  # atomic: a concurrent run never loads half a file
        return path

    with ThreadPoolExecutor(len(groups)) as pool:
        paths = list(pool.map(build, groups))
    return [([s.key for s in g], p) for g, p in zip(groups, paths)]
