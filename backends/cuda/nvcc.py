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
