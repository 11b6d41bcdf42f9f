"""The graph IR: a NetworkX MultiDiGraph of operations.

Conventions (checked by `verify`):
- node ids are ints in creation order, which is a topological order;
- node attributes (torch.fx's `node.meta`): `op` (op table name), `attrs` (the op's pydantic
  model), `name` (dotted instance path, e.g. `bottleneck3.conv2`), `span` (the `.cnn` source),
  `callstack` (tuple of (block name, call-site span), outermost first), `path` (block instance
  path); analyses add `shape`, `pads`, `params`, `buffers`, `macs`, `bytes`, `rf`;
- an edge u → v carries `port`: the position of u among v's inputs (concat order matters; the
  same tensor may feed two ports, hence a multigraph);
- graph attributes: `network`, `input` (node id), `output` (node id), `classes`, `blocks`
  (instance path → call information), `train` (the validated train section or None).
"""

from __future__ import annotations

import networkx as nx

from cnnc.dsl.errors import CnncError, InternalError, Note

from .ops import OPS


def has_extent(shape) -> bool:
    """A C×H×W map with more than one position (not C×1×1, not a flat vector)."""
    return len(shape) == 3 and shape[1] * shape[2] > 1


def inputs_of(g: nx.MultiDiGraph, n: int) -> list[int]:
    """A node's input nodes in port order."""
    pred = g.pred[n]
    if len(pred) == 1:  # the common case: one producer, usually through one port
        ((u, keys),) = pred.items()
        return [u] * len(keys)
    edges = sorted((d["port"], u) for u, keys in pred.items() for d in keys.values())
    return [u for _, u in edges]


def topo_order(g: nx.MultiDiGraph) -> list[int]:
    return list(nx.lexicographical_topological_sort(g))


def located(err: CnncError, g: nx.MultiDiGraph, n: int) -> CnncError:
    """Attach node n's source span and block call sites to an error raised without a location."""
    meta = g.nodes[n]
    if err.span is None:
        err.span = meta.get("span")
    err.notes.extend(callstack_notes(meta.get("callstack", ())))
    return err


def callstack_notes(callstack, shown: int = 6) -> list[Note]:
    """'in block `b`, called here' for each call site, innermost first; a deep stack shows its ends."""
    notes = [Note(span, f"in block `{block}`, called here") for block, span in reversed(callstack)]
    if len(notes) > 2 * shown:
        skipped = len(notes) - 2 * shown
        notes = notes[:shown] + [Note(None, f"... {skipped} more block calls ...")] + notes[-shown:]
    return notes


def verify(g: nx.MultiDiGraph) -> None:
    """Check the graph invariants above; a failure is a compiler bug, reported as an InternalError."""
    problems = []
    if not nx.is_directed_acyclic_graph(g):
        problems.append("graph has a cycle")
    inputs = [n for n, d in g.nodes(data=True) if d.get("op") in OPS and OPS[d["op"]].inputs == (0, 0)]
    if len(inputs) != 1 or g.graph.get("input") != inputs[0]:
        problems.append(f"expected exactly one input node, found {inputs}")
    if g.graph.get("output") not in g:
        problems.append("output node missing")
    for n, d in g.nodes(data=True):
        op = OPS.get(d.get("op"))
        if op is None:
            problems.append(f"node {n}: unknown op {d.get('op')!r}")
            continue
        if not isinstance(d.get("attrs"), op.attrs):
            problems.append(f"node {n}: attrs are not {op.attrs.__name__}")
        ports = sorted(p for _, _, p in g.in_edges(n, data="port"))
        if ports != list(range(len(ports))):
            problems.append(f"node {n} ({d.get('name')}): ports {ports} are not 0..k-1")
        lo, hi = op.inputs
        if len(ports) < lo or (hi is not None and len(ports) > hi):
            problems.append(f"node {n} ({d.get('name')}): {len(ports)} inputs, {op.name} takes {op.inputs}")
        if "span" not in d or "name" not in d:
            problems.append(f"node {n}: missing span or name")
        for u in inputs_of(g, n):
            if u >= n:
                problems.append(f"node {n}: input {u} created later (ids must be topological)")
    names = [d["name"] for _, d in g.nodes(data=True) if "name" in d]
    if len(names) != len(set(names)):
        problems.append("node names are not unique")
    if problems:
        raise InternalError("graph invariants violated:\n  " + "\n  ".join(problems))
