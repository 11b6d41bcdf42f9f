"""Analysis passes over the graph: shape inference and counting.

Each pass is a plain function graph → graph that writes its results into node attributes
(and totals into graph attributes). They read everything op-specific from the op table.
"""

from __future__ import annotations

import math

import networkx as nx

from cnnc.dsl.errors import CnncError, CnncWarning, Diagnostics, Note

from .graph import has_extent, inputs_of, located
from .ops import GLOBAL, OPS, Window, fmt_shape, resolve_pads

FLOAT_BYTES = 4


def infer_shapes(g: nx.MultiDiGraph, diags: Diagnostics) -> nx.MultiDiGraph:
    """Give every node its output `shape` (and resolved `pads` for windowed ops).

    A node whose input failed gets shape None and no further error, so one mistake is
    reported once.
    """
    for n in sorted(g.nodes):
        meta = g.nodes[n]
        op = OPS[meta["op"]]
        srcs = inputs_of(g, n)
        in_shapes = [g.nodes[u].get("shape") for u in srcs]
        meta["shape"] = None
        if any(s is None for s in in_shapes):
            continue
        try:
            meta["shape"] = tuple(op.shape(meta["attrs"], in_shapes))
        except CnncError as err:
            if len(srcs) > 1:
                for i, u in enumerate(srcs):
                    src = g.nodes[u]
                    err.notes.append(Note(src["span"], f"operand {i + 1} `{src['name']}` has shape "
                                                       f"{fmt_shape(src['shape'])}"))
            diags.add(located(err, g, n))
            continue
        pad = meta["attrs"].get("pad", None)
        if pad is not None and len(in_shapes[0]) == 3:
            a = meta["attrs"]
            kernel = _effective_kernel(a)
            meta["pads"] = resolve_pads(pad, in_shapes[0][1], in_shapes[0][2], kernel,
                                        a.get("stride", None) or a.kernel)
    return g


def find_unused(g: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """Warn about layers whose result never reaches the output (g.graph["warnings"])."""
    out = g.graph["output"]
    live = nx.ancestors(g, out) | {out}
    warnings = []
    for n in sorted(g.nodes):
        if n not in live and g.out_degree(n) == 0:
            d = g.nodes[n]
            w = CnncWarning(f"the result of `{d['name']}` is never used", d["span"],
                            "name it and use it, or remove it; it still counts in the totals")
            w.notes.extend(located(CnncError(""), g, n).notes)
            warnings.append(w)
    g.graph["warnings"] = warnings
    return g


def _effective_kernel(a) -> tuple[int, int]:
    d = a.get("dilation", (1, 1))
    return (d[0] * (a.kernel[0] - 1) + 1, d[1] * (a.kernel[1] - 1) + 1)


def count(g: nx.MultiDiGraph, batch: int = 1) -> nx.MultiDiGraph:
    """Per node: `params`, `trainable`, `buffers`, `macs`, `bytes` (output at `batch`), `rf`.

    Totals go to g.graph["totals"]. Activation memory is counted in float32: for inference
    the peak of tensors alive at once when nodes run in id order; for training the sum of all
    outputs, since backward needs them.
    """
    params = trainable = buffers = macs = 0
    for n in sorted(g.nodes):
        meta = g.nodes[n]
        op = OPS[meta["op"]]
        srcs = inputs_of(g, n)
        ins = [g.nodes[u]["shape"] for u in srcs]
        specs = op.params(meta["attrs"], ins)
        p = sum(math.prod(s.shape) for s in specs if not s.buffer)
        b = sum(math.prod(s.shape) for s in specs if s.buffer)
        m = op.macs(meta["attrs"], ins, meta["shape"])
        meta.update(params=p, buffers=b, macs=m, param_specs=specs,
                    bytes=math.prod(meta["shape"]) * batch * FLOAT_BYTES,
                    rf=_receptive_field(g, n, op, ins, srcs))
        params += p
        trainable += p if meta["attrs"].trainable else 0
        buffers += b
        macs += m
    g.graph["totals"] = {
        "params": params, "trainable": trainable, "non_trainable": params - trainable, "buffers": buffers,
        "param_bytes": params * FLOAT_BYTES, "buffer_bytes": buffers * FLOAT_BYTES, "macs": macs * batch,
        "batch": batch, "inference_bytes": _peak_live_bytes(g),
        "training_bytes": sum(d["bytes"] for _, d in g.nodes(data=True)),
    }
    return g


def _receptive_field(g, n, op, ins, inputs):
    """(size_h, size_w, jump_h, jump_w) in input pixels, or GLOBAL once a layer sees the whole image."""
    if not inputs:
        return (1, 1, 1, 1)
    return grow_receptive_field(receptive_input(g, n, inputs), op.window(g.nodes[n]["attrs"], ins))


def receptive_input(g, n, inputs):
    """The receptive field node n's window grows from: its inputs' (size_h, size_w, jump_h, jump_w), the
    largest of each, or GLOBAL."""
    srcs = [g.nodes[u]["rf"] for u in inputs]
    spatial = [s for s, u in zip(srcs, inputs) if s != GLOBAL or has_extent(g.nodes[u]["shape"])]
    if len(spatial) < len(srcs) and spatial and has_extent(g.nodes[n]["shape"]):
        srcs = spatial  # a C×1×1 gate over a map (squeeze-excitation) rescales channels; the window is the map's
    if any(s == GLOBAL for s in srcs):
        return GLOBAL
    return tuple(max(s[i] for s in srcs) for i in range(4))


def grow_receptive_field(rf_in, win):
    """A window's growth of the field: r_out = r_in + (F − 1)·j_in, j_out = j_in·S per axis."""
    if rf_in == GLOBAL or win == GLOBAL:
        return GLOBAL
    size_h, size_w, jump_h, jump_w = rf_in
    if isinstance(win, Window):
        return (size_h + (win.kh - 1) * jump_h, size_w + (win.kw - 1) * jump_w, jump_h * win.sh, jump_w * win.sw)
    return rf_in


def _peak_live_bytes(g: nx.MultiDiGraph) -> int:
    last_use = {n: n for n in g.nodes}
    for u, v in g.edges():
        last_use[u] = max(last_use[u], v)
    last_use[g.graph["output"]] = max(g.nodes) + 1
    free_at: dict[int, list[int]] = {}
    for n, t in last_use.items():
        free_at.setdefault(t, []).append(n)
    live = peak = 0
    for n in sorted(g.nodes):
        live += g.nodes[n]["bytes"]
        peak = max(peak, live)
        for dead in free_at.get(n, []):
            live -= g.nodes[dead]["bytes"]
    return peak
