"""The graph `cnnc viz -O1` / `-O2` draws: the network after that level's inference rewrites.

The rewrites fold BatchNorm into the weights before them, and fuse what the backend has kernels
for, so the graph comes from a Model (weights initialised after the memory check) optimised for
the default backend, as `cnnc compile` would. The drawing (compiler/viz.py) takes the graph and
knows nothing of the runtime.
"""

from __future__ import annotations

import os

import networkx as nx

from cnnc.compiler import viz

from .artifact import compile_graph
from .model import Model


def load_graph(path: str | os.PathLike, opt_level: int = 0, import_roots=()) -> nx.MultiDiGraph:
    """The checked graph of a `.cnn` file, or the graph after the -O level's rewrites (inference)."""
    if opt_level == 0:
        return viz.load_graph(path, import_roots)
    model = Model.load(path, import_roots=import_roots)
    g, _, _ = compile_graph(model, opt_level)
    return g
