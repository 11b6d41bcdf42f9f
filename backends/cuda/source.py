"""Specialised kernel sources: a `.cu` template plus the problem's constants as #defines.

Every kernel template in `kernels/` writes its constants as macros (C, H, W, K, R, S, ...) and
its entry points as `extern "C" __global__ void KERNEL(name)(...)`. A `KernelSpec` names the
template, the constants and the tile configuration; rendering puts each spec in its own
namespace with `KERNEL(name)` expanding to `name_<key>`, so that many specs compile together in
one translation unit (one nvcc or NVRTC run per network) without clashing. The key hashes the
template text, the shared headers it includes, the defines and KERNEL_VERSION, so a changed
kernel (or a changed op table) is never served from a stale cache. Nothing here needs CuPy or a GPU.

Shared headers: a template line `#include "cnnc/NAME"` names one of `SHARED` (the element-wise
ops generated from the op table, `elementwise.py`; the GEMM register-tile loop,
`kernels/gemm_tile.cuh`; the forward conv kernels' tile loaders and main loop,
`kernels/conv_tiles.cuh`; the tensor-core tile product, `kernels/tensor_tile.cuh`). Rendering
drops the line from the spec's namespace and the translation unit holds each included header
once, at file scope, before the specs; headers are self-contained and guarded, so the order of
specs does not matter.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KERNEL_DIR = Path(__file__).with_name("kernels")
KERNEL_VERSION = 1  # bump when launch conventions change in a way the sources do not show


@lru_cache(maxsize=None)
def template_text(name: str) -> str:
    return (KERNEL_DIR / name).read_text(encoding="utf-8")


def _elementwise_header() -> str:
    from .elementwise import header  # the op table, imported on first use
    return header()


SHARED = {
    "cnnc/elementwise.cuh": _elementwise_header,
    "cnnc/gemm_tile.cuh": lambda: template_text("gemm_tile.cuh"),
    "cnnc/conv_tiles.cuh": lambda: template_text("conv_tiles.cuh"),
    "cnnc/tensor_tile.cuh": lambda: template_text("tensor_tile.cuh"),
}
_INCLUDE = re.compile(r'^[ \t]*#include[ \t]+"(cnnc/[^"]+)"[ \t]*$', re.M)


@lru_cache(maxsize=None)
def includes(template: str) -> tuple[str, ...]:
    """The shared headers a template includes, in order."""
    names = tuple(dict.fromkeys(_INCLUDE.findall(template_text(template))))
    unknown = [n for n in names if n not in SHARED]
    if unknown:
        raise ValueError(f"{template} includes unknown shared headers {unknown}; known: {sorted(SHARED)}")
    return names


@lru_cache(maxsize=None)
def shared_text(name: str) -> str:
    return SHARED[name]()


@lru_cache(maxsize=None)
def _body(template: str) -> str:
    """The template with its shared includes replaced by a note (they come once per unit)."""
    return _INCLUDE.sub(lambda m: f"// {m.group(1)}: included once above, at file scope", template_text(template))


@lru_cache(maxsize=None)
def _key(template: str, defines: tuple) -> str:
    h = hashlib.sha1()
    h.update(f"{KERNEL_VERSION}|{template}|{defines}|".encode())
    h.update(template_text(template).encode())
    for name in includes(template):
        h.update(f"|{name}|".encode())
        h.update(shared_text(name).encode())
    return h.hexdigest()[:12]


# Defines that only give a kernel its tensor sizes, paddings and constants: two specs that differ in
# these alone run the same code paths (kernel sizes, strides, tiles, groups > 1 and epilogues do not).
SIZE_DEFINES = frozenset({
    "C", "H", "W", "K", "P", "Q", "PQ", "HW", "CTOT", "INNER", "COLS", "OH", "OW", "CO", "BEFORE",
    "PAD_L", "PAD_T", "PB", "PL", "PR", "PT", "DIL_H", "DIL_W", "SPLITS", "ARG0", "ARG1", "EPS", "MOMENTUM",
    "ONE_MINUS_M", "ALPHA", "ALPHA_N", "BETA", "COEF", "SIZE", "SCALE", "THRESH", "CHAIN_ARG0", "CHAIN_ARG1"})


@dataclass(frozen=True)
class KernelSpec:
    template: str  # file under kernels/, e.g. "conv_fwd.cu"
    defines: tuple[tuple[str, int | float | str], ...]  # sorted (NAME, value) pairs
    entries: tuple[str, ...]  # the KERNEL(name) entry points the template defines

    @staticmethod
    def make(template: str, entries: tuple[str, ...], **defines) -> "KernelSpec":
        return KernelSpec(template, tuple(sorted(defines.items())), tuple(entries))

    @property
    def key(self) -> str:
        return _key(self.template, self.defines)

    @property
    def variant(self) -> tuple:
        """The template and the defines that choose code paths (see SIZE_DEFINES): one compiled spec per
        variant exercises every path the set of specs takes."""
        return (self.template,) + tuple((k, v > 1 if k == "GROUPS" else v) for k, v in self.defines
                                        if k not in SIZE_DEFINES)

    def symbol(self, entry: str) -> str:
        """The compiled name of an entry point."""
        return f"{entry}_{self.key}"

    def define(self, name: str):
        return dict(self.defines)[name]

    def render(self) -> str:
        lines = [f"// {self.template} {dict(self.defines)}", f"#define KERNEL(name) name##_{self.key}"]
        lines += [f"#define {k} {_literal(v)}" for k, v in self.defines]
        lines += [f"namespace k_{self.key} {{", _body(self.template), "}"]
        lines += [f"#undef {k}" for k, _ in self.defines] + ["#undef KERNEL", ""]
        return "\n".join(lines)


def _literal(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v!r}f"
    return str(v)


PRELUDE = """// Generated by cnnc: specialised kernels, one namespace per problem.
#define CNNC_DIV_UP(a, b) (((a) + (b) - 1) / (b))
"""


def headers(specs) -> str:
    """The shared headers these specs include, each once."""
    names = dict.fromkeys(name for spec in specs for name in includes(spec.template))
    return "\n".join(f"// ---- {name} ----\n{shared_text(name)}" for name in names)


def translation_unit(specs) -> str:
    """One .cu text holding every distinct spec, after the shared headers they include."""
    seen, unique = set(), []
    for spec in specs:
        if spec.key not in seen:
            seen.add(spec.key)
            unique.append(spec)
    return "\n".join([PRELUDE, headers(unique)] + [spec.render() for spec in unique])
