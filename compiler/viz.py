"""`cnnc viz`: draw a network's graph with Graphviz, or as one interactive HTML page.

The drawing itself (DOT text, its ids and classes, running Graphviz) is compiler/viz_dot.py; the
page is compiler/viz_html.py, built on that drawing. This module picks the format from the output
name and writes the file; the drawing's names are importable from here too.

It draws the graph it is given: the checked graph (`load_graph`), or the graph after the -O
level's rewrites, which the runtime makes (cnnc.runtime.viz.load_graph: BatchNorm folding needs
the weights, and the fusions the backend's kernels).
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx

from cnnc.dsl.errors import CnncError

from .pipeline import check
from .viz_dot import (CLUSTER_FILL, EDGE_STYLE, FILL, FONT, INSTALL_HINT, KIND, BlockInfo, View, VizOptions,
                      attrs_dict, block_infos, block_label_rows, build_view, classify_edges, dot_binary, fused_text,
                      human, node_tooltip, op_text, pads_text, run_dot, shape_text, to_dot)
from .viz_html import build_html

FORMATS = ("svg", "png", "pdf", "dot", "html")


def load_graph(path: str | os.PathLike, import_roots=()) -> nx.MultiDiGraph:
    """The checked graph of a `.cnn` file, as written (cnnc.runtime.viz.load_graph: after rewrites)."""
    return check(path, import_roots=import_roots)


def format_of(output: str | os.PathLike, fmt: str | None = None) -> str:
    fmt = (fmt or Path(output).suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise CnncError(f"cannot tell the output format from `{output}`",
                        hint="name a file ending in .svg, .png, .pdf, .dot or .html, or give --format")
    return fmt


def write(g: nx.MultiDiGraph, output: str | os.PathLike, opts: VizOptions | None = None,
          fmt: str | None = None, notes: list[str] | None = None) -> str:
    """Draw g to `output` in the format its extension names; returns the format. Notes for the
    reader (a bitmap scaled to fit) are added to `notes`."""
    opts = opts or VizOptions()
    fmt = format_of(output, fmt)
    if fmt == "html":
        text = build_html(g, opts)
        Path(output).write_text(text, encoding="utf-8")
        return fmt
    dot_text = to_dot(g, opts)
    if fmt == "dot":
        Path(output).write_text(dot_text, encoding="utf-8")
        return fmt
    if fmt == "png" and "dpi" not in opts.extra_graph_attrs:
        dot_text = dot_text.replace("  graph [", "  graph [dpi=96 ", 1)
    run_dot(dot_text, fmt, output, notes=notes)
    return fmt


__all__ = ["CLUSTER_FILL", "EDGE_STYLE", "FILL", "FONT", "FORMATS", "INSTALL_HINT", "KIND", "BlockInfo", "View",
           "VizOptions", "attrs_dict", "block_infos", "block_label_rows", "build_html", "build_view",
           "classify_edges", "dot_binary", "format_of", "fused_text", "human", "load_graph", "node_tooltip",
           "op_text", "pads_text", "run_dot", "shape_text", "to_dot", "write"]
