"""The drawing of `cnnc viz`: a network's graph as a DOT text, and Graphviz to render it.

The graph becomes a DOT text; Graphviz's `dot` lays it out and renders SVG, PNG or PDF.
compiler/viz.py picks the format and writes the file; the interactive page
(compiler/viz_html.py) embeds this drawing. Conventions of the drawing, which tests and the
page rely on:

- each block instance is a cluster, subgraph `cluster_<path>` (path dotted, e.g.
  `cluster_stage1.bottleneck2`), SVG id `cluster-<path>`, class `block`; nested calls nest;
- a block instance drawn collapsed (`--collapse`, `--depth N`) is one node, id `block-<path>`,
  class `collapsed`, labelled with its call, input → output shapes and parameters;
- a layer is a node with id `node-<name>` (dotted instance name), class `layer op-<op> kind-<kind>`
  (`fused` added for nodes made by fusion);
- an edge has id `edge-<u>-<v>-<port>` (layer ids) or `edge-<from id>-<to id>` (collapsed
  drawings) and class `shortcut` (a residual input of an `add` or fused conv that bypasses the
  chain), `dense` (an input of a `concat`, labelled with its position) or `flow`; it is labelled
  with the tensor's shape, C×H×W.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import networkx as nx

from cnnc.dsl.errors import CnncError

from .graph import inputs_of
from .ops import OPS, Pattern, fmt_shape
from .summary import _fmt_args, describe

INSTALL_HINT = ("install Graphviz: `apt-get install graphviz` (Debian, Ubuntu), `dnf install graphviz` (Fedora), "
                "`brew install graphviz` (macOS) or `conda install graphviz`; `-o FILE.dot` works without it")

KIND = {name: op.kind for name, op in OPS.items()}  # what each op is drawn as: the op table's `kind`
FILL = {"io": "#e3e3e3", "conv": "#cfe2f3", "dense": "#f4cccc", "pool": "#d9ead3", "norm": "#fff2cc",
        "act": "#fce5cd", "merge": "#d9d2e9", "misc": "#ffffff", "block": "#ead1dc"}
CLUSTER_FILL = ("#f5f8fc", "#ebf1f9", "#e1eaf6", "#d7e3f3")
EDGE_STYLE = {
    "flow": 'color="#666666"',
    "shortcut": 'color="#d62728" fontcolor="#d62728" style=dashed penwidth=1.6',
    "dense": 'color="#2b8a3e" fontcolor="#2b8a3e" penwidth=1.3',
}
FONT = "Helvetica,Arial,sans-serif"


@dataclass
class VizOptions:
    rankdir: str = "TB"
    shapes: bool = True  # tensor shapes on edges and nodes
    params: bool = True  # parameter counts on nodes and clusters
    depth: int | None = None  # block levels drawn as clusters; deeper instances are single nodes; None: all
    title: bool = True
    tooltips: bool = True
    toggle_room: bool = False  # room at the end of cluster labels for the page's collapse button
    extra_graph_attrs: dict = field(default_factory=dict)


# ---- facts about the graph -----------------------------------------------------------------

def human(n: int) -> str:
    """1234 → 1.2K, 25557032 → 25.6M."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(n)


def shape_text(shape) -> str:
    return fmt_shape(shape) if shape else "?"


def classify_edges(g: nx.MultiDiGraph) -> dict[tuple[int, int, int], str]:
    """Edge (u, v, port) → `shortcut`, `dense` or `flow`.

    A shortcut is an input of an `add` other than its main path, the input with the longest chain
    of layers behind it (the chain the add sits on); the residual input of a fused conv is one too.
    Every input of a `concat` is a dense connection."""
    depth: dict[int, int] = {}
    for n in sorted(g.nodes):
        depth[n] = 1 + max((depth[u] for u in g.predecessors(n)), default=0)
    kinds: dict[tuple[int, int, int], str] = {}
    for v in sorted(g.nodes):
        d = g.nodes[v]
        edges = sorted(g.in_edges(v, data="port"), key=lambda e: e[2])
        op = OPS[d["op"]]
        if op.kind == "merge" and op.pattern is Pattern.INJECTIVE:  # a concatenation
            for u, _, p in edges:
                kinds[(u, v, p)] = "dense"
        elif op.residual_fusable and len(edges) > 1:  # a sum: the shortest path in is the shortcut
            main = max(edges, key=lambda e: (depth[e[0]], e[0]))
            for u, _, p in edges:
                kinds[(u, v, p)] = "flow" if (u, p) == (main[0], main[2]) else "shortcut"
        elif d["attrs"].get("residual", False):
            for u, _, p in edges:
                kinds[(u, v, p)] = "shortcut" if p == 1 else "flow"
        else:
            for u, _, p in edges:
                kinds[(u, v, p)] = "flow"
    return kinds


@dataclass
class BlockInfo:
    path: tuple[str, ...]
    block: str
    args: dict
    span: object
    params: int = 0
    macs: int = 0
    layers: int = 0
    output: int | None = None
    inputs: list[int] = field(default_factory=list)  # producers outside the block, first use first

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def call(self) -> str:
        return f"{self.block}({_fmt_args(self.args)})"


def block_infos(g: nx.MultiDiGraph) -> dict[tuple, BlockInfo]:
    """Per block instance: totals over its layers, its output node and its outside inputs."""
    infos = {p: BlockInfo(p, b["block"], b["args"], b.get("span")) for p, b in g.graph["blocks"].items()}
    out_node = g.graph["output"]
    for n in sorted(g.nodes):
        d = g.nodes[n]
        path = d.get("path", ())
        for i in range(1, len(path) + 1):
            info = infos.get(path[:i])
            if info is None:  # a block instance the rewrites left empty
                continue
            info.params += d.get("params", 0)
            info.macs += d.get("macs", 0)
            info.layers += 1
            leaves = n == out_node or any(g.nodes[v].get("path", ())[:i] != path[:i] for v in g.successors(n))
            if leaves:
                info.output = n
            for u in inputs_of(g, n):
                if g.nodes[u].get("path", ())[:i] != path[:i] and u not in info.inputs:
                    info.inputs.append(u)
    return {p: i for p, i in infos.items() if i.layers}


def pads_text(d) -> str:
    pads = d.get("pads")
    if not pads or not any(pads):
        return ""
    return f"pad {pads[0]}" if len(set(pads)) == 1 else "pad " + ",".join(map(str, pads))


def op_text(d) -> str:
    """`conv 3x3/2 64 pad 1`: the op and its key attributes (kernel, stride, filters, groups, pad)."""
    text = describe(d["op"], d["attrs"])
    op = OPS[d["op"]]
    if d["attrs"].get("ops") is not None:  # a chain of element-wise ops
        text = " → ".join(d["attrs"].ops)
    elif not op.user and op.label:  # a fused op, drawn as what it is made from
        text = text.replace(d["op"], op.label, 1)
    p = pads_text(d)
    return f"{text} {p}" if p else text


def _self_describing(local: str, op: str, text: str) -> bool:
    """`relu3` (a relu) and `bn2` (a batchnorm) need no second line saying `relu`, `batchnorm`."""
    if text != op or op not in OPS:
        return False
    base = local.rstrip("0123456789").rstrip("_")
    return base == op or base in OPS[op].aliases


def fused_text(d) -> str:
    return " + ".join(OPS[op].label or op for op, _, _ in d.get("fused_from", ()))


def attrs_dict(d) -> dict:
    """The op's attributes that differ from their defaults (plus the required ones)."""
    from .ops import OPS

    fields = OPS[d["op"]].attrs.model_fields
    out = {}
    for k, v in d["attrs"].model_dump().items():
        info = fields.get(k)
        if k in ("name", "trainable", "lr_mult", "decay_mult") and (info is None or info.default == v):
            continue
        if info is not None and not info.is_required() and info.default == v:
            continue
        if isinstance(v, tuple) and all(isinstance(x, int) for x in v):
            v = "x".join(map(str, v))
        elif isinstance(v, tuple):
            v = ", ".join(map(str, v))
        out[k] = v
    if d.get("pads"):
        out["pad"] = ",".join(map(str, d["pads"]))
    return out


# ---- the drawing ---------------------------------------------------------------------------

def _q(s: str) -> str:
    """A DOT double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _h(s: str) -> str:
    """Text inside a DOT HTML-like label."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _wrap(text: str, width: int = 44) -> list[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return lines + [cur] if cur else lines


@dataclass
class View:
    """What one drawing shows: which block instances are clusters and which single nodes."""

    g: nx.MultiDiGraph
    opts: VizOptions
    infos: dict[tuple, BlockInfo]
    kinds: dict[tuple[int, int, int], str]

    def owner(self, n: int) -> tuple | None:
        """The collapsed block instance that hides node n, or None when n is drawn itself."""
        depth = self.opts.depth
        path = self.g.nodes[n].get("path", ())
        if depth is None or len(path) <= depth:
            return None
        for i in range(depth + 1, len(path) + 1):  # the outermost instance still present
            if path[:i] in self.infos:
                return path[:i]
        return None

    def vis_id(self, n: int) -> str:
        o = self.owner(n)
        return f"block-{'.'.join(o)}" if o else f"node-{self.g.nodes[n]['name']}"


def build_view(g: nx.MultiDiGraph, opts: VizOptions) -> View:
    return View(g, opts, block_infos(g), classify_edges(g))


def _node_stmt(view: View, n: int, src_lines) -> str:
    d = view.g.nodes[n]
    opts = view.opts
    kind = KIND.get(d["op"], "misc")
    local = d.get("local_name", d["name"])
    rows = [f"<b>{_h(local)}</b>"]
    text = op_text(d)
    if not _self_describing(local, d["op"], text):
        rows.append(_h(text))
    if d.get("fused_from"):
        rows.append(f'<font color="#7a4b00">[{_h(fused_text(d))}]</font>')
    if opts.shapes and d.get("shape"):
        rows.append(f'<font color="#444444">{_h(shape_text(d["shape"]))}</font>')
    if opts.params and d.get("params"):
        rows.append(f'<font color="#444444">{_h(human(d["params"]))} params</font>')
    label = "<" + "<br/>".join(rows) + ">"
    classes = f"layer op-{d['op']} kind-{kind}" + (" fused" if d.get("fused_from") else "")
    if n == view.g.graph["output"]:
        classes += " output"
    attrs = [f"id={_q('node-' + d['name'])}", f"class={_q(classes)}", f"label={label}",
             f'fillcolor="{FILL[kind]}"']
    if kind == "io":
        attrs.append("shape=box style=filled")
    if OPS[d["op"]].kind == "merge" and OPS[d["op"]].pattern is Pattern.INJECTIVE:  # a concatenation: in order
        attrs.append("ordering=in")
    if opts.tooltips:
        attrs.append(f"tooltip={_q(node_tooltip(d, src_lines))}")
    return f"  n{n} [{' '.join(attrs)}];"


def node_tooltip(d, src_lines) -> str:
    lines = [f"{d['name']}: {op_text(d)}"]
    if d.get("fused_from"):
        lines.append("fused: " + " + ".join(name for _, name, _ in d["fused_from"]))
    if d.get("shape"):
        lines.append(f"output {shape_text(d['shape'])}")
    lines.append(f"params {d.get('params', 0):,}, MACs {d.get('macs', 0):,}")
    span = d.get("span")
    if span is not None:
        lines.append(f"{span.file}:{span.line}: {src_lines(span).strip()}")
    return "\n".join(lines)


def block_label_rows(view: View, info: BlockInfo, collapsed: bool) -> list[str]:
    g, opts = view.g, view.opts
    if collapsed:
        rows = [f"<b>{_h(info.path[-1])}</b>"]
    else:  # one text run: a bold name and a plain call side by side come apart in other fonts
        rows = [f"<b>{_h(info.path[-1])} = {_h(info.call)}</b>" + ("&#160;" * 6 if opts.toggle_room else "")]
    if collapsed:
        rows += [_h(line) for line in _wrap(info.call)]
        if opts.shapes:
            ins = ", ".join(shape_text(g.nodes[u].get("shape")) for u in info.inputs) or "?"
            out = shape_text(g.nodes[info.output].get("shape")) if info.output is not None else "?"
            rows.append(f'<font color="#444444">{_h(ins)} → {_h(out)}</font>')
        rows.append(f'<font color="#444444">{info.layers} layers'
                    + (f", {_h(human(info.params))} params" if opts.params else "") + "</font>")
    elif opts.params:
        rows.append(f'<font color="#444444">{_h(human(info.params))} params, {info.layers} layers</font>')
    rows = [r + '<br align="left"/>' for r in rows[:-1]] + [rows[-1] + '<br align="left"/>'] if not collapsed else rows
    return rows


def _source_lines():
    cache: dict[int, list[str]] = {}

    def line_of(span) -> str:
        src = span.source
        lines = cache.get(id(src))
        if lines is None:
            lines = cache[id(src)] = src.text.splitlines()
        return lines[span.line - 1] if 1 <= span.line <= len(lines) else ""
    return line_of


def to_dot(g: nx.MultiDiGraph, opts: VizOptions | None = None, view: View | None = None) -> str:
    """The DOT text of the drawing."""
    opts = opts or VizOptions()
    view = view or build_view(g, opts)
    src_lines = _source_lines()
    infos = view.infos
    out = [f"digraph {_q(g.graph.get('network', 'network'))} {{"]
    gattrs = {"rankdir": opts.rankdir, "newrank": "true", "nodesep": "0.2", "ranksep": "0.28",
              "fontname": _q(FONT), "fontsize": "11", "outputorder": "edgesfirst", "bgcolor": "white",
              "id": _q("graph-" + g.graph.get("network", "network")), "class": _q("cnnc-graph")}
    if opts.title:
        t = g.graph.get("totals", {})
        inp = g.nodes[g.graph["input"]].get("shape")
        outp = g.nodes[g.graph["output"]].get("shape")
        title = f"{g.graph.get('network', '')}: {shape_text(inp)} → {shape_text(outp)}"
        params = sum(d.get("params", 0) for _, d in g.nodes(data=True))
        macs = sum(d.get("macs", 0) for _, d in g.nodes(data=True))
        title += f", {g.number_of_nodes()} layers, {len(infos)} block instances"
        if opts.params:
            title += f", {params:,} params, {human(macs or t.get('macs', 0))} MACs"
        gattrs.update(label=_q(title), labelloc="t", labeljust="l", fontsize="14")
    gattrs.update(opts.extra_graph_attrs)
    out.append("  graph [" + " ".join(f"{k}={v}" for k, v in gattrs.items()) + "];")
    out.append(f'  node [shape=box style="rounded,filled" fontname={_q(FONT)} fontsize=10 margin="0.08,0.03" '
               f'height=0.3 penwidth=0.8 color="#555555"];')
    out.append(f'  edge [fontname={_q(FONT)} fontsize=8 arrowsize=0.6 color="#666666"];')

    # the tree of drawn items: cluster path → member statements and child clusters
    members: dict[tuple, list[str]] = {(): []}
    children: dict[tuple, list[tuple]] = {(): []}
    depth = opts.depth
    for p in infos:  # insertion order = call order
        if depth is not None and len(p) > depth:
            continue
        members.setdefault(p, [])
        children.setdefault(p, [])
        parent = p[:-1]
        while parent and parent not in infos:
            parent = parent[:-1]
        children.setdefault(parent, []).append(p)
    drawn_blocks: set[tuple] = set()
    for n in sorted(g.nodes):
        o = view.owner(n)
        if o is not None:
            if o not in drawn_blocks:
                drawn_blocks.add(o)
                members[_cluster_of(o[:-1], members)].append(_block_stmt(view, infos[o]))
            continue
        path = g.nodes[n].get("path", ())
        members[_cluster_of(path, members)].append(_node_stmt(view, n, src_lines))

    def emit(p: tuple, indent: str) -> None:
        for stmt in members.get(p, []):
            out.append(indent + stmt.strip())
        for c in children.get(p, []):
            info = infos[c]
            fill = CLUSTER_FILL[min(len(c) - 1, len(CLUSTER_FILL) - 1)]
            label = "<" + "".join(block_label_rows(view, info, False)) + ">"
            out.append(f"{indent}subgraph {_q('cluster_' + info.key)} {{")
            tip = f"{info.key} = {info.call}: {info.layers} layers, {info.params:,} params, {info.macs:,} MACs"
            if info.span is not None:
                tip += f"\n{info.span.file}:{info.span.line}: {src_lines(info.span).strip()}"
            out.append(f"{indent}  graph [id={_q('cluster-' + info.key)} class={_q('block block-' + info.block)} "
                       f"label={label} labeljust=l style=\"rounded,filled\" fillcolor=\"{fill}\" "
                       f"color=\"#7f97b8\" penwidth=1 fontsize=10"
                       + (f" tooltip={_q(tip)}" if opts.tooltips else "") + "];")
            emit(c, indent + "  ")
            out.append(f"{indent}}}")
    emit((), "  ")

    # edges
    seen: set[tuple[str, str]] = set()
    for u, v, port in sorted(g.edges(data="port"), key=lambda e: (e[1], e[2])):
        a, b = view.vis_id(u), view.vis_id(v)
        if a == b:
            continue  # inside one collapsed block
        collapsed = a.startswith("block-") or b.startswith("block-")
        if collapsed:
            if (a, b) in seen:
                continue
            seen.add((a, b))
        kind = "flow" if b.startswith("block-") else view.kinds.get((u, v, port), "flow")
        eid = f"edge-{a}-{b}" if collapsed else f"edge-{u}-{v}-{port}"
        label = []
        if kind == "dense" and g.in_degree(v) > 1:
            label.append(f"#{port + 1}")
        if opts.shapes and g.nodes[u].get("shape"):
            label.append(shape_text(g.nodes[u]["shape"]))
        attrs = [f"id={_q(eid)}", f"class={_q(kind)}", EDGE_STYLE[kind]]
        if label:
            attrs.append(f"label={_q(' '.join(label))}")
        if opts.tooltips:
            attrs.append(f"tooltip={_q(_edge_tip(g, u, v, kind))}")
        src = _dot_id(view, u, a)
        dst = _dot_id(view, v, b)
        out.append(f"  {src} -> {dst} [{' '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def _edge_tip(g, u, v, kind) -> str:
    what = {"shortcut": "shortcut", "dense": "concatenated", "flow": ""}[kind]
    s = f"{g.nodes[u]['name']} → {g.nodes[v]['name']}"
    if g.nodes[u].get("shape"):
        s += f": {shape_text(g.nodes[u]['shape'])}"
    return f"{s} ({what})" if what else s


def _dot_id(view: View, n: int, vis: str) -> str:
    return _q(vis) if vis.startswith("block-") else f"n{n}"


def _cluster_of(path: tuple, members: dict) -> tuple:
    while path and path not in members:
        path = path[:-1]
    return path


def _block_stmt(view: View, info: BlockInfo) -> str:
    label = "<" + "<br/>".join(block_label_rows(view, info, True)) + ">"
    attrs = [f"id={_q('block-' + info.key)}", f"class={_q('collapsed block-' + info.block)}", f"label={label}",
             f'shape=box3d style=filled fillcolor="{FILL["block"]}"']
    if view.opts.tooltips:
        tip = f"{info.key} = {info.call}: {info.layers} layers, {info.params:,} params, {info.macs:,} MACs"
        attrs.append(f"tooltip={_q(tip)}")
    return f"  {_q('block-' + info.key)} [{' '.join(attrs)}];"


# ---- rendering -----------------------------------------------------------------------------

def dot_binary() -> str | None:
    return shutil.which("dot")


def run_dot(dot_text: str, fmt: str, out: str | os.PathLike | None = None, timeout: float = 600,
            notes: list[str] | None = None) -> bytes:
    """Lay out and render with Graphviz; returns the output bytes when `out` is None. Graphviz's
    warnings that matter to a reader (a bitmap scaled down to fit) are added to `notes`."""
    exe = dot_binary()
    if exe is None:
        raise CnncError(f"`cnnc viz` needs Graphviz's `dot` program for .{fmt} output, and it is not on PATH",
                        hint=INSTALL_HINT)
    cmd = [exe, f"-T{fmt}"]
    if out is not None:
        cmd += ["-o", str(out)]
    try:
        r = subprocess.run(cmd, input=dot_text.encode("utf-8"), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CnncError(f"Graphviz took more than {timeout:.0f} s to lay out the graph",
                        hint="try --collapse or --depth N") from None
    if r.returncode != 0:
        raise CnncError(f"Graphviz failed (exit {r.returncode}): {r.stderr.decode(errors='replace').strip()}")
    if notes is not None:
        for line in r.stderr.decode(errors="replace").splitlines():
            m = re.search(r"too large for cairo-renderer bitmaps\. Scaling by ([\d.]+)", line)
            if m:
                notes.append(f"the drawing is too large for one bitmap: Graphviz scaled the .{fmt} down to "
                             f"{100 * float(m.group(1)):.0f}%; .svg and .pdf keep every detail, and --collapse or "
                             f"--depth N make it smaller")
    return r.stdout
