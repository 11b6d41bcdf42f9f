"""CuPy, imported only when a CUDA backend is really used, plus the module cache and allocation.

`cupy()` imports CuPy or raises a clear error; nothing else in the package imports CuPy at
module level, so the CPU install never needs it. `function(spec, entry)` returns a launchable
kernel: from a cubin that `cnnc compile` built (registered with `use_cubin`) or else compiled
with NVRTC from the rendered source (CuPy caches those on disk). `empty(shape)` is how every
kernel allocates its outputs; tests switch on `POISON` to fill new arrays with NaN, so that an
element a kernel forgot to write fails the comparison.
"""

from __future__ import annotations

from pathlib import Path

from cnnc.dsl.errors import CnncError

from .source import KernelSpec, translation_unit

POISON = False
_modules: dict[str, object] = {}
_cubins: dict[str, Path] = {}
_cupy = None


def cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy as cp
        except ImportError:
            raise CnncError("the CUDA backend needs CuPy", hint="pip install 'cnnc[cuda]' (cupy-cuda13x)") from None
        try:
            if cp.cuda.runtime.getDeviceCount() < 1:
                raise CnncError("the CUDA backend needs an NVIDIA GPU; none is visible")
        except cp.cuda.runtime.CUDARuntimeError as exc:
            raise CnncError(f"the CUDA backend needs an NVIDIA GPU: {exc}") from None
        _cupy = cp
    return _cupy


def gpu_available() -> bool:
    try:
        cupy()
        return True
    except CnncError:
        return False


def use_cubin(keys, path: Path) -> None:
    """Kernels with these spec keys are in the cubin at `path` (from a compiled artifact)."""
    for key in keys:
        _cubins[key] = Path(path)


def prebuild(specs) -> bool:
    """Compile these specs ahead of use with nvcc, in parallel and cached on disk, when nvcc is
    installed; otherwise each is compiled by NVRTC on first launch. Returns whether nvcc ran."""
    from . import nvcc
    missing = [s for s in specs if s.key not in _cubins and s.key not in _modules]
    if not missing or nvcc.find_nvcc() is None:
        return False
    for keys, path in nvcc.build_cubins(missing):
        use_cubin(keys, path)
    return True


def function(spec: KernelSpec, entry: str):
    cp = cupy()
    module = _modules.get(spec.key)
    if module is None:
        if spec.key in _cubins:  # one module per cubin file, shared by all its specs
            path = str(_cubins[spec.key])
            module = _modules.get(path) or cp.RawModule(path=path)
            _modules[path] = module
        else:
            module = cp.RawModule(code=translation_unit([spec]), options=("-std=c++17",))
        _modules[spec.key] = module
    return module.get_function(spec.symbol(entry))


def empty(shape, dtype="float32"):
    cp = cupy()
    if POISON and cp.dtype(dtype).kind == "f":
        return cp.full(shape, cp.nan, dtype=dtype)
    return cp.empty(shape, dtype=dtype)
