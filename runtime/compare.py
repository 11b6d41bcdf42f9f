"""`cnnc compare`: several networks side by side, one row each, and a bubble chart of them.

Every figure is one the project already computes: parameters, buffers and MACs are
`cnnc check`'s totals (MACs per image); the receptive field is the one `count` gives each
layer; activation memory is `compiler.optimize.activation_peak`, the lifetimes the memory
planner packs and the memory check before `cnnc run` and `cnnc train` adds up (for training,
activations and their gradients alive at once during a step). Inference memory is at batch 1,
training memory at the file's `train:` batch (the default 64 without one); `batch` sets both.
Depth counts the weighted layers (the op table's `conv` and `dense` kinds) on the longest
path from the input to the output, as papers count them: VGG-16 has 16, ResNet-50 50.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import networkx as nx

from cnnc.compiler.graph import has_extent
from cnnc.compiler.ops import GLOBAL, OPS, fmt_shape
from cnnc.compiler.optimize import activation_peak
from cnnc.compiler.pipeline import check
from cnnc.compiler.summary import fmt_rf, human_bytes
from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import CnncError, CnncErrors, CnncWarning

from .files import write_atomic

WEIGHTED_KINDS = frozenset({"conv", "dense"})  # op-table kinds that hold a layer's weights and count toward depth
PLOT_FORMATS = ("png", "svg", "pdf")
PLOT_HINT = "pip install 'cnnc[plot]' (matplotlib)"


@dataclass(frozen=True)
class Entry:
    """One network's figures, exact: counts per image, memory in bytes at the batch beside it."""

    file: str
    network: str
    input: tuple[int, ...]
    params: int
    buffers: int
    macs: int  # conv and dense multiply-accumulates per image, as `cnnc check` counts them
    depth: int
    rf: str | tuple[int, int, int, int]  # the output's: "global" once it sees the whole image
    feature_rf: tuple[int, int, int, int]  # the largest finite one on the way: what global pooling or dense reads
    inference_batch: int
    inference_bytes: int
    training_batch: int
    training_bytes: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["input"] = list(self.input)
        d["rf"] = self.rf if self.rf == GLOBAL else list(self.rf)
        d["feature_rf"] = list(self.feature_rf)
        return d


def weighted_depth(g: nx.MultiDiGraph) -> int:
    """Weighted layers (conv, dense) on the longest input → output path. A C×1×1 gate broadcast over a
    map (squeeze-excitation) is a side branch, as papers count depth: its layers are left out."""
    longest: dict[int, int] = {}
    for n in nx.topological_sort(g):
        own = OPS[g.nodes[n]["op"]].kind in WEIGHTED_KINDS
        preds = list(g.predecessors(n))
        if has_extent(g.nodes[n]["shape"]):
            spatial = [u for u in preds if has_extent(g.nodes[u]["shape"])]
            preds = spatial or preds
        longest[n] = own + max((longest[u] for u in preds), default=0)
    return longest[g.graph["output"]]



def feature_rf(g: nx.MultiDiGraph) -> tuple[int, int, int, int]:
    """The largest finite receptive field among the output and the layers it depends on.

    Receptive fields only grow along a path, so this is the output's own when that is finite,
    and otherwise the field of the features the first layer that sees the whole image reads."""
    out = g.graph["output"]
    fields = [g.nodes[n]["rf"] for n in nx.ancestors(g, out) | {out} if g.nodes[n]["rf"] != GLOBAL]
    return max(fields, key=lambda rf: (rf[0] * rf[1], rf))


def entry(path: str | os.PathLike, g: nx.MultiDiGraph, batch: int | None = None) -> Entry:
    """The figures of one checked graph (checked at batch 1)."""
    t = g.graph["totals"]
    train = g.graph.get("train") or TrainConfig()
    inference_batch = batch or 1
    training_batch = batch or train.batch
    out_rf = g.nodes[g.graph["output"]]["rf"]
    return Entry(
        file=str(path), network=g.graph["network"], input=tuple(g.nodes[g.graph["input"]]["shape"]),
        params=t["params"], buffers=t["buffers"], macs=t["macs"] // t["batch"], depth=weighted_depth(g),
        rf=out_rf if out_rf == GLOBAL else tuple(out_rf), feature_rf=tuple(feature_rf(g)),
        inference_batch=inference_batch, inference_bytes=activation_peak(g, inference_batch, False),
        training_batch=training_batch, training_bytes=activation_peak(g, training_batch, True))


def compare(paths, batch: int | None = None, import_roots=()) -> tuple[list[Entry], list[CnncWarning]]:
    """Check every file and return its figures, in the order given, and the files' warnings.

    Every file is checked even after one fails, as a compiler does; then all their errors are
    raised together as one CnncErrors."""
    if not paths:
        raise CnncError("compare needs at least one .cnn file")
    if batch is not None and batch < 1:
        raise CnncError(f"batch size must be positive, got {batch}")
    entries: list[Entry] = []
    errors: list[CnncError] = []
    warnings: list[CnncWarning] = []
    for path in paths:
        try:
            g = check(path, batch=1, import_roots=import_roots)
        except CnncErrors as exc:
            errors.extend(exc.errors)
            continue
        except CnncError as exc:
            errors.append(exc)
            continue
        warnings.extend(g.graph.get("warnings", []))
        entries.append(entry(path, g, batch))
    if errors:
        raise CnncErrors(errors)
    return entries, warnings


# ---- the table ---------------------------------------------------------------------------------

def human_count(n: int) -> str:
    """61706 → `61.7 K`, 4089184256 → `4.09 G`: three significant figures, SI prefixes."""
    if abs(n) < 1000:
        return str(n)
    value, unit = float(n), ""
    for unit in ("K", "M", "G", "T", "P"):
        value /= 1000
        text = f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
        if float(text) < 1000 or unit == "P":
            return f"{text} {unit}"
    return str(n)  # pragma: no cover


def table(entries: list[Entry]) -> str:
    header = ("network", "input", "params", "buffers", "MACs", "depth", "RF", "inference", "training", "batch")
    body = [(e.network, fmt_shape(e.input), human_count(e.params), human_count(e.buffers), human_count(e.macs),
             str(e.depth), fmt_rf(e.feature_rf), human_bytes(e.inference_bytes), human_bytes(e.training_bytes),
             str(e.training_batch)) for e in entries]
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(len(header))]
    left = {0, 1, 6}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    inference = ", ".join(map(str, sorted({e.inference_batch for e in entries})))
    legend = [
        "MACs: multiply-accumulates per image, as `cnnc check` counts them. depth: conv and dense layers on the",
        "longest path. RF: receptive field (size /stride in input pixels) of the features the first layer",
        "seeing the whole image reads. inference: activations alive at once at batch " + inference + "; training:",
        "activations and their gradients alive at once in a training step at the batch of the last column (float32).",
    ]
    return "\n".join([line(header).rstrip(), "  ".join("-" * w for w in widths)] +
                     [line(b).rstrip() for b in body] + [""] + legend)


# ---- the plot ----------------------------------------------------------------------------------

def plot_format(path: str | os.PathLike) -> str:
    """The format a plot path's extension names; a CnncError for any other."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise CnncError(f"--plot writes .png, .svg or .pdf, got `{path}`",
                        hint=f"name the file {Path(path).with_suffix('.png').name}")
    return fmt


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CnncError("--plot needs matplotlib, which is not installed", hint=PLOT_HINT) from None
    return plt


def require_plotting() -> None:
    """Raise the install hint now, before any work, when matplotlib is missing."""
    _pyplot()


def write_plot(entries: list[Entry], path: str | os.PathLike) -> None:
    """MACs against parameters, one bubble per network, its area proportional to inference
    activation memory, labelled with the network's name. An axis is logarithmic when its
    figures are all positive and span more than a factor of 20."""
    fmt = plot_format(path)
    plt = _pyplot()
    from matplotlib.ticker import EngFormatter
    xs = [e.params for e in entries]
    ys = [e.macs for e in entries]
    biggest = max(max(e.inference_bytes for e in entries), 1)
    max_area = 2400.0  # points², the largest bubble: about 55 points across
    areas = [max_area * e.inference_bytes / biggest for e in entries]
    fig, ax = plt.subplots(figsize=(9, 6.5))
    try:
        ax.scatter(xs, ys, s=areas, alpha=0.45, color="tab:blue", edgecolors="tab:blue", linewidths=1.2, zorder=2)
        ax.scatter(xs, ys, s=4, color="black", zorder=3)
        for set_scale, axis, values in ((ax.set_xscale, ax.xaxis, xs), (ax.set_yscale, ax.yaxis, ys)):
            if min(values) > 0 and max(values) / min(values) > 20:
                set_scale("log")
            else:  # 20 M rather than 0.2 under a 1e8 offset
                axis.set_major_formatter(EngFormatter(sep=" "))
        _pad_limits(ax, xs, ys)
        ax.set_xlabel("parameters")
        ax.set_ylabel("MACs per image")
        ax.set_title("MACs against parameters; bubble area: inference activation memory "
                     f"(batch {entries[0].inference_batch})", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        key = _size_key(ax, biggest, max_area)
        fig.tight_layout()  # before labelling: the label placement reads the final positions
        _label(fig, ax, entries, xs, ys, areas, key)
        write_atomic(Path(path), lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        plt.close(fig)


def _pad_limits(ax, xs, ys) -> None:
    """Room around the outermost bubbles for them and their labels: 8% of the span on each side
    (10% of the span in decades on a log axis, at least 0.15 of a decade)."""
    for values, get_scale, set_limits in ((xs, ax.get_xscale, ax.set_xlim), (ys, ax.get_yscale, ax.set_ylim)):
        lo, hi = min(values), max(values)
        if get_scale() == "log":
            factor = 10 ** max(0.1 * math.log10(hi / lo), 0.15)
            set_limits(lo / factor, hi * factor)
        else:
            margin = 0.08 * (hi - lo) if hi > lo else max(abs(hi), 1) * 0.5
            set_limits(lo - margin, hi + margin)


def _label(fig, ax, entries, xs, ys, areas, key) -> None:
    """Each name beside its bubble, at the first of eight positions around it whose text box
    stays inside the axes and overlaps no label already placed, the size key, or another bubble;
    failing that, where it overlaps the fewest."""
    renderer = fig.canvas.get_renderer()
    centres = ax.transData.transform(list(zip(xs, ys)))
    radii = [max(math.sqrt(a / math.pi) * fig.dpi / 72, 3.0) for a in areas]  # points² → pixels; dots at least
    placed = [key.get_window_extent(renderer)]
    axes_box = ax.get_window_extent(renderer)
    directions = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
    for i, e in enumerate(entries):
        best = None
        for dx, dy in directions:
            gap = (radii[i] + 4) * (0.72 if dx and dy else 1.0) * 72 / fig.dpi  # points from the centre
            text = ax.annotate(e.network, (xs[i], ys[i]), xytext=(dx * gap, dy * gap),
                               textcoords="offset points", fontsize=10, zorder=4,
                               ha={1: "left", 0: "center", -1: "right"}[dx],
                               va={1: "bottom", 0: "center", -1: "top"}[dy])
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            clash = sum(box.overlaps(p) for p in placed) + (not _inside(box, axes_box)) + sum(
                _box_hits_circle(box, centres[j], radii[j]) for j in range(len(entries)) if j != i)
            if best is None or clash < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clash, text, box)
            else:
                text.remove()
            if clash == 0:
                break
        placed.append(best[2])


def _inside(box, outer) -> bool:
    return outer.x0 <= box.x0 and box.x1 <= outer.x1 and outer.y0 <= box.y0 and box.y1 <= outer.y1


def _box_hits_circle(box, centre, radius) -> bool:
    nearest_x = min(max(centre[0], box.x0), box.x1)
    nearest_y = min(max(centre[1], box.y0), box.y1)
    return (nearest_x - centre[0]) ** 2 + (nearest_y - centre[1]) ** 2 < radius ** 2


def _size_key(ax, biggest: int, max_area: float):
    """A legend of two reference bubbles, the largest network's memory and a tenth of it."""
    for nbytes in (biggest, biggest // 10):
        if nbytes:
            ax.scatter([], [], s=max_area * nbytes / biggest, alpha=0.45, color="tab:blue", label=human_bytes(nbytes))
    return ax.legend(title="inference memory", loc="upper left", labelspacing=2.2, borderpad=1.2,
                     handletextpad=2.4, frameon=True, fontsize=9, title_fontsize=9)
