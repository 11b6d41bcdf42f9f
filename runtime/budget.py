"""Memory estimates, checked before anything large is allocated.

Before weights are initialised, a batch is run or training starts, cnnc adds up what it is
about to allocate: weights and BatchNorm buffers; for training also their gradients and the
optimizer's state; and the activations of a batch, alive at once under the lifetimes the
memory planner uses (`compiler.optimize.activation_peak`). The sum is compared with the memory
this machine has available now (MemAvailable in /proc/meminfo, or what the process's cgroup
still allows when that is less). More than that is a CnncError pointing at the layer that
needs the most, with every figure and a hint, before the first byte is allocated. Kernel
workspace (im2col columns, padded copies) is not counted: the estimate is a floor, and its job
is to refuse what cannot possibly fit, not to promise that what passes will.

`--max-memory SIZE` on the command line (`override`) or the environment variable
CNNC_MAX_MEMORY sets the limit instead: `64G`, `512M`, `1.5GiB`, or `none` to turn the check
off.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

from cnnc.compiler.optimize import activation_peak
from cnnc.compiler.summary import human_bytes
from cnnc.dsl.errors import CnncError, Note, Span

ENV = "CNNC_MAX_MEMORY"
FLOAT_BYTES = 4
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_override: list[int | None] = []  # innermost last; None: no limit


def parse_size(text: str, what: str = "--max-memory") -> int | None:
    """`64G`, `512M`, `1.5GiB`, `2000000000` → bytes; `none` → None (no limit)."""
    t = str(text).strip().lower()
    if t in ("none", "off", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", t)
    if not m or float(m.group(1)) <= 0:
        raise CnncError(f"{what} takes a size such as 8G, 512M or 1.5GiB (or none), got `{text}`")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@contextlib.contextmanager
def override(limit: str | None):
    """Within the block, the limit is `limit` (a size text as --max-memory takes) instead of
    the available memory; `None` leaves the usual rule in force."""
    if limit is None:
        yield
        return
    _override.append(parse_size(limit))
    try:
        yield
    finally:
        _override.pop()


def available_bytes() -> int | None:
    """Memory this process can still get: MemAvailable, capped by a cgroup limit; None if unknown."""
    figures = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    figures.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 writes a huge number for "no limit"
            figures.append(max(int(limit) - usage, 0))
        break
    return min(figures) if figures else None


def limit() -> tuple[int | None, str]:
    """The limit in bytes (None: no check) and where it comes from, for messages."""
    if _override:
        return _override[-1], "--max-memory"
    if os.environ.get(ENV):
        return parse_size(os.environ[ENV], ENV), ENV
    return available_bytes(), "available"


@dataclass
class Estimate:
    """What an action is about to allocate, part by part, and the layer that needs the most."""

    what: str  # "training lenet5 at batch 64"
    parts: list[tuple[str, int]] = field(default_factory=list)
    span: Span | None = None
    biggest: str | None = None  # "layer `fc6` holds 37,752,832 parameters"

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    def check(self, hint: str) -> None:
        """Raise a CnncError when the total exceeds the limit; otherwise do nothing."""
        cap, source = limit()
        total = self.total
        if cap is None or total <= cap:
            return
        where = "the limit set by --max-memory" if source == "--max-memory" else \
            f"the limit set by {ENV}" if source == ENV else "the memory available on this machine"
        err = CnncError(f"{self.what} needs an estimated {human_bytes(total)} of memory, more than "
                        f"{where} ({human_bytes(cap)})", self.span,
                        f"{hint}; or --max-memory SIZE (or {ENV}) to set the limit yourself")
        err.notes.append(Note(None, "estimate: " + ", ".join(f"{label} {human_bytes(b)}"
                                                            for label, b in self.parts if b)))
        if self.biggest:
            err.notes.append(Note(None, self.biggest))
        raise err


def weights_estimate(g, what: str, copies: int = 1) -> Estimate:
    """Weights and buffers of a checked graph (`copies` of them: an optimiser pass keeps two)."""
    t = g.graph["totals"]
    est = Estimate(what, [("weights and buffers" + (f" ×{copies}" if copies > 1 else ""),
                           copies * (t["param_bytes"] + t["buffer_bytes"]))])
    _point_at_biggest(est, g, "params", lambda n: f"{n:,} parameters")
    return est


def run_estimate(g, what: str, batch: int, training: bool = False, optimizer_arrays: int = 0,
                 optimizer: str = "") -> Estimate:
    """Weights, (for training) gradients and optimizer state, and a batch's activations."""
    t = g.graph["totals"]
    weights = t["param_bytes"] + t["buffer_bytes"]
    parts = [("weights and buffers", weights)]
    if training:
        trainable = t["trainable"] * FLOAT_BYTES
        parts.append(("gradients", trainable))
        if optimizer_arrays:
            parts.append((f"{optimizer} state", optimizer_arrays * trainable))
    acts = activation_peak(g, batch, training)
    parts.append((f"activations at batch {batch}", acts))
    est = Estimate(what, parts)
    if acts > weights:
        _point_at_biggest(est, g, "bytes", lambda b: f"{human_bytes(b * batch // max(t['batch'], 1))} of output "
                                                     f"at batch {batch}")
    else:
        _point_at_biggest(est, g, "params", lambda n: f"{n:,} parameters")
    return est


def _point_at_biggest(est: Estimate, g, key: str, describe) -> None:
    best = max(g.nodes, key=lambda n: g.nodes[n].get(key) or 0, default=None)
    if best is None or not g.nodes[best].get(key):
        return
    d = g.nodes[best]
    est.span = d.get("span")
    est.biggest = f"the largest layer is `{d['name']}`: {describe(d[key])}"
