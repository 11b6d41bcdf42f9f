"""`cnnc viz -o model.html`: one self-contained interactive page.

Graphviz lays out the fully expanded graph once (the same drawing as `cnnc viz -o x.svg`, see
compiler/viz_dot.py for its ids and classes); the page embeds that SVG, a JSON description of every
layer and block instance, and the script and style sheet of compiler/viz_assets/ inline, so it
opens without any network access.

In the browser, collapsing a block instance hides its layers, its inner edges and its cluster,
and draws a summary box (call, input → output shapes, parameters) where the cluster was; the
band of the drawing the cluster occupied is squeezed to the summary's size and everything past it
moves up (or left, for `--rankdir LR`), so collapsed drawings stay compact without a second
layout. Clicking a summary expands the instance again; clicking a cluster collapses it. The
initial state follows `--collapse` / `--depth N` (default: everything expanded).
"""

from __future__ import annotations

import html
import json
from dataclasses import replace
from importlib import resources

import networkx as nx

from .graph import inputs_of
from .ops import fmt_shape
from .viz_dot import (FILL, KIND, VizOptions, _source_lines, attrs_dict, build_view, fused_text, human, op_text,
                      run_dot, shape_text, to_dot)

ASSETS = ("viz.css", "viz.js")


def asset(name: str) -> str:
    """The text of one file of compiler/viz_assets/, shipped with the package."""
    return resources.files("cnnc.compiler").joinpath("viz_assets", name).read_text(encoding="utf-8")


def page_data(g: nx.MultiDiGraph, view, opts: VizOptions) -> dict:
    """Everything the page's script needs, keyed by the SVG ids of compiler/viz.py."""
    src_lines = _source_lines()
    batch = g.graph.get("totals", {}).get("batch", 1)
    nodes = {}
    ids = {}
    for n in sorted(g.nodes):
        d = g.nodes[n]
        nid = f"node-{d['name']}"
        ids[n] = nid
        span = d.get("span")
        nodes[nid] = {
            "name": d["name"], "local": d.get("local_name", d["name"]), "op": d["op"],
            "kind": KIND.get(d["op"], "misc"), "text": op_text(d),
            "attrs": {k: str(v) for k, v in attrs_dict(d).items()},
            "shape": shape_text(d.get("shape")) if d.get("shape") else None,
            "inputs": [shape_text(g.nodes[u].get("shape")) for u in inputs_of(g, n)],
            "params": d.get("params", 0), "macs": d.get("macs", 0) * batch, "batch": batch,
            "fused": [f"{op} {name}" for op, name, _ in d.get("fused_from", ())],
            "fusedText": fused_text(d) if d.get("fused_from") else None,
            "file": span.file if span is not None else None, "line": span.line if span is not None else None,
            "col": span.col if span is not None else None, "src": src_lines(span) if span is not None else None,
            "block": ".".join(d.get("path", ())),
        }
    blocks = {}
    for p, info in view.infos.items():
        parent = p[:-1]
        while parent and parent not in view.infos:
            parent = parent[:-1]
        blocks[info.key] = {
            "key": info.key, "name": p[-1], "block": info.block, "call": info.call, "depth": len(p),
            "parent": ".".join(parent) if parent else None,
            "params": info.params, "macs": info.macs * batch, "layers": info.layers,
            "ins": [shape_text(g.nodes[u].get("shape")) for u in info.inputs],
            "out": shape_text(g.nodes[info.output].get("shape")) if info.output is not None else None,
            "file": info.span.file if info.span is not None else None,
            "line": info.span.line if info.span is not None else None,
            "src": src_lines(info.span) if info.span is not None else None,
        }
    edges = [[f"edge-{u}-{v}-{port}", ids[u], ids[v], view.kinds.get((u, v, port), "flow")]
             for u, v, port in g.edges(data="port")]
    inp = g.nodes[g.graph["input"]].get("shape")
    outp = g.nodes[g.graph["output"]].get("shape")
    return {
        "network": g.graph.get("network"), "rankdir": opts.rankdir, "initialDepth": opts.depth,
        "showShapes": opts.shapes, "showParams": opts.params,
        "input": fmt_shape(inp) if inp else None, "output": fmt_shape(outp) if outp else None,
        "params": sum(d.get("params", 0) for _, d in g.nodes(data=True)),
        "macs": sum(d.get("macs", 0) for _, d in g.nodes(data=True)) * batch, "batch": batch,
        "nodes": nodes, "blocks": blocks, "edges": edges, "colors": FILL,
    }


def _script_json(obj) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def build_html(g: nx.MultiDiGraph, opts: VizOptions | None = None) -> str:
    opts = opts or VizOptions()
    layout = replace(opts, depth=None, tooltips=False, title=False, toggle_room=True)
    view = build_view(g, layout)
    svg = run_dot(to_dot(g, layout, view), "svg").decode("utf-8")
    svg = svg[svg.index("<svg"):]
    data = page_data(g, view, opts)
    name = g.graph.get("network", "network")
    params = data["params"]
    summary = (f"{data['input']} → {data['output']} · {g.number_of_nodes()} layers · {len(view.infos)} block "
               f"instances · {params:,} params ({human(params)}) · {human(data['macs'])} MACs")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="cnnc viz">
<link rel="icon" href="data:,">
<title>{html.escape(name)} · cnnc viz</title>
<style>
{asset("viz.css")}
</style>
</head>
<body>
<header id="toolbar">
  <div id="title"><b>{html.escape(name)}</b> <span id="summary">{html.escape(summary)}</span></div>
  <div id="controls">
    <div id="search-wrap">
      <input id="search" type="search" placeholder="Search layers (e.g. conv1)" autocomplete="off"
             aria-label="search layer names">
      <ul id="results" hidden></ul>
    </div>
    <span id="match-count"></span>
    <button id="expand-all" type="button" title="expand every block">Expand all</button>
    <button id="collapse-all" type="button" title="collapse every block">Collapse all</button>
    <button id="zoom-out" type="button" title="zoom out">−</button>
    <button id="zoom-fit" type="button" title="fit the width of the window">Fit</button>
    <button id="zoom-in" type="button" title="zoom in">+</button>
    <span id="counts"></span>
  </div>
</header>
<main>
  <div id="canvas">
{svg}
  </div>
  <aside id="details">
    <p class="hint">Hover over or click a layer for its attributes, shape, parameters, MACs and source
    line. Click a block's box to collapse it, a collapsed block to expand it.</p>
  </aside>
</main>
<script type="application/json" id="cnnc-data">{_script_json(data)}</script>
<script>
{asset("viz.js")}
</script>
</body>
</html>
"""
