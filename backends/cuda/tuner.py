"""Choose a tile configuration per problem on first use, and remember the choice on disk.

The cache and the modes are backends/tuning.py's; the key here is the GPU name, CUDA version,
kernel version and the problem. Timing uses CUDA events around a few launches after a warm-up.
"""

from __future__ import annotations

from .. import tuning
from .source import KERNEL_VERSION

MODE = tuning.mode_from_env()
MODES = tuning.MODES


def device_key() -> str:
    from .device import cupy
    cp = cupy()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"{name}|cuda{cp.cuda.runtime.runtimeGetVersion()}|k{KERNEL_VERSION}"


def choose(problem: str, candidates: list, time_candidate, mode: str | None = None):
    """The best of `candidates` for `problem` on this GPU; `time_candidate(c)` returns seconds per launch."""
    mode = tuning.checked_mode(mode or MODE)
    if mode == "off" or len(candidates) == 1:  # no GPU query for the heuristic's first
        return candidates[0]
    return tuning.choose(f"{device_key()}|{problem}", candidates, time_candidate, mode)


def time_launches(launch, repeats: int = 5) -> float:
    """Median seconds of `launch()` measured with CUDA events after one warm-up launch."""
    from .device import cupy
    cp = cupy()
    launch()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1000.0)
    times.sort()
    return times[len(times) // 2]
