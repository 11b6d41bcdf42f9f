"""What `cnnc check` shows: a per-layer table with block instances nested, totals, and JSON.

Reads only analysis results already in the graph (shapes, counts, receptive fields).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .ops import GLOBAL, OPS, fmt_shape


@dataclass
class Row:
    depth: int
    name: str
    op: str
    shape: tuple | None
    params: int
    macs: int
    bytes: int
    rf: str
    line: int | None
    is_block: bool = False


def describe(op: str, a) -> str:
    """A short text of an op and its key attributes: `conv 3x3/2 64`, `maxpool 3x3/2`, `dense 1000`."""
    parts = [op]
    k = a.get("kernel", None)
    if k is not None:
        s = a.get("stride", None) or k
        parts.append(f"{k[0]}x{k[1]}" + (f"/{s[0]}" if s[0] == s[1] and s[0] != 1 else
                                          f"/{s[0]}x{s[1]}" if s != (1, 1) else ""))
    for attr in ("filters", "units", "size"):
        v = a.get(attr, None)
        if v is not None:
            parts.append(f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
    g = a.get("groups", 1)
    if g != 1:
        parts.append(f"g{g}")
    d = a.get("dilation", (1, 1))
    if d != (1, 1):
        parts.append(f"d{d[0]}")
    r = a.get("rate", None)
    if r is not None:
        parts.append(f"{r:g}")
    return " ".join(parts)


def fmt_rf(rf) -> str:
    if rf == GLOBAL:
        return "global"
    h, w, jh, jw = rf
    size = f"{h}" if h == w else f"{h}x{w}"
    jump = f"{jh}" if jh == jw else f"{jh}x{jw}"
    return f"{size} /{jump}"


def _fmt_args(args: dict) -> str:
    def show(v):
        if isinstance(v, tuple):
            return "x".join(map(str, v)) if all(isinstance(x, int) for x in v) else str(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"{v:g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={show(v)}" for k, v in args.items())


def rows(g: nx.MultiDiGraph) -> list[Row]:
    """Table rows in execution order; a block instance's header row precedes its layers."""
    blocks = g.graph["blocks"]
    # Sums and output shape per block instance, over every node under it.
    agg: dict[tuple, dict] = {}
    for n in sorted(g.nodes):
        d = g.nodes[n]
        for i in range(1, len(d["path"]) + 1):
            a = agg.setdefault(d["path"][:i], {"params": 0, "macs": 0, "bytes": 0, "last": n})
            a["params"] += d["params"]
            a["macs"] += d["macs"]
            a["bytes"] += d["bytes"]
            a["last"] = n
    out: list[Row] = []
    opened: set[tuple] = set()
    for n in sorted(g.nodes):
        d = g.nodes[n]
        path = d["path"]
        for i in range(1, len(path) + 1):
            prefix = path[:i]
            if prefix in opened:
                continue
            opened.add(prefix)
            info, a = blocks[prefix], agg[prefix]
            last = g.nodes[info.get("output", a["last"])]
            out.append(Row(i - 1, prefix[-1], f"{info['block']}({_fmt_args(info['args'])})", last["shape"],
                           a["params"], a["macs"], a["bytes"], fmt_rf(last["rf"]), info["span"].line, True))
        out.append(Row(len(path), d["local_name"], describe(d["op"], d["attrs"]), d["shape"], d["params"],
                       d["macs"], d["bytes"], fmt_rf(d["rf"]), d["span"].line if d.get("span") else None))
    return out


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def table(g: nx.MultiDiGraph) -> str:
    t = g.graph["totals"]
    header = ("layer", "op", "output", "params", "MACs", "memory", "RF")
    body = []
    for r in rows(g):
        body.append(("  " * r.depth + r.name, r.op, fmt_shape(r.shape) if r.shape else "?", f"{r.params:,}",
                     f"{r.macs * t['batch']:,}", human_bytes(r.bytes), r.rf))
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(len(header))]
    right = {3, 4, 5}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(b).rstrip() for b in body]
    out.append("")
    out.append(totals_text(g))
    return "\n".join(out)


def totals_text(g: nx.MultiDiGraph) -> str:
    t = g.graph["totals"]
    inp = g.nodes[g.graph["input"]]["shape"]
    outp = g.nodes[g.graph["output"]]["shape"]
    lines = [
        f"network {g.graph['network']}: input {fmt_shape(inp)} → output {fmt_shape(outp)}, "
        f"{g.number_of_nodes() - 1} layers, {len(g.graph['blocks'])} block instances",
        f"params:      {t['params']:,} total ({human_bytes(t['param_bytes'])}), {t['trainable']:,} trainable, "
        f"{t['non_trainable']:,} non-trainable",
        f"buffers:     {t['buffers']:,} (BatchNorm running statistics, {human_bytes(t['buffer_bytes'])})",
        f"MACs:        {t['macs']:,} at batch {t['batch']} ({2 * t['macs'] / 1e9:.2f} GFLOPs)",
        f"activations: {human_bytes(t['inference_bytes'])} peak for inference, "
        f"{human_bytes(t['training_bytes'])} kept for training, at batch {t['batch']} (float32)",
    ]
    return "\n".join(lines)


def to_json(g: nx.MultiDiGraph) -> dict:
    t = g.graph["totals"]
    layers = []
    for n in sorted(g.nodes):
        d = g.nodes[n]
        layers.append({"name": d["name"], "op": d["op"], "shape": list(d["shape"]), "params": d["params"],
                       "buffers": d["buffers"], "macs": d["macs"] * t["batch"], "bytes": d["bytes"],
                       "rf": d["rf"] if d["rf"] == GLOBAL else list(d["rf"]),
                       "line": d["span"].line, "file": d["span"].file,
                       "block": ".".join(d["path"]) or None})
    return {
        "network": g.graph["network"],
        "input": list(g.nodes[g.graph["input"]]["shape"]),
        "output": list(g.nodes[g.graph["output"]]["shape"]),
        "classes": g.graph.get("classes"),
        "batch": t["batch"],
        "params": {"total": t["params"], "trainable": t["trainable"], "non_trainable": t["non_trainable"],
                   "bytes": t["param_bytes"]},
        "buffers": t["buffers"],
        "macs": t["macs"],
        "memory": {"inference_peak_bytes": t["inference_bytes"], "training_bytes": t["training_bytes"]},
        "layers": layers,
        "blocks": [{"name": ".".join(p), "block": b["block"], "args": {k: _jsonable(v) for k, v in b["args"].items()},
                    "line": b["span"].line} for p, b in g.graph["blocks"].items()],
        "train": g.graph["train"].model_dump() if g.graph.get("train") is not None else None,
        "ops": sorted({d["op"] for _, d in g.nodes(data=True)} & set(OPS)),
    }


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    return str(v)
