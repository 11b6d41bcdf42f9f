"""Graph rewrites: the passes that make cnnc a compiler. Each is a plain function graph → graph.

Every rewrite appends a record to g.graph["report"] naming the `.cnn` lines it came from, and
every fusion that was possible in shape but refused says why (two consumers, no fused kernel
in the backend, ...). Fusion is decided from the op table: an op whose pattern is
out-element-wise-fusable and that declares `fused_as` absorbs a following residual merge
(`residual_fusable`) and an op with an element-wise formula; a broadcast product that declares
`gate_fused_as` absorbs the element-wise op making its C×1×1 gate; an op that declares `act_fused_as`
(BatchNorm, where it stays in the plan) absorbs a following element-wise op; runs of such ops fuse into one;
the backend's capability query (`ctx.fusion_refusal`) may refuse any fusion, with its reason.
The passes test no op names but those of the ops they create themselves (`CHAIN`, `LAYOUT`).

Rewrites that change weights (BatchNorm folding) read and write g.graph["params"], the host
parameter arrays. Passes that would change gradients run for inference only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

from .graph import inputs_of
from .ops import OPS, Pattern, formula_args, resolve_pads


def _elementwise(g, n) -> bool:
    """An op the table gives an element-wise formula: what epilogues and chains fuse."""
    return OPS[g.nodes[n]["op"]].formula is not None


@dataclass
class Record:
    pass_name: str
    text: str
    spans: list
    refused: bool = False

    def render(self) -> str:
        spans = [s for s in self.spans if s is not None]
        if not spans:
            return self.text
        lines = sorted({s.line for s in spans})
        where = f"{spans[0].file}:{','.join(map(str, lines))}"
        return f"{where} {self.text}"


# ---- graph surgery ------------------------------------------------------------------------

def consumers(g: nx.MultiDiGraph, n: int) -> list[tuple[int, int]]:
    """(consumer, port) pairs of node n's output; the output node counts as consumed."""
    return sorted((v, p) for _, v, p in g.out_edges(n, data="port"))


def _single_consumer(g, n) -> int | None:
    cs = consumers(g, n)
    if len(cs) == 1 and n != g.graph["output"]:
        return cs[0][0]
    return None


def bypass(g: nx.MultiDiGraph, n: int, source: int) -> None:
    """Remove node n, feeding its consumers from `source` instead."""
    for v, port in consumers(g, n):
        g.add_edge(source, v, port=port)
    if g.graph["output"] == n:
        g.graph["output"] = source
    g.remove_node(n)


def refresh(g: nx.MultiDiGraph, n: int) -> None:
    """Recompute an edited node's shape and parameter specs from the op table."""
    d = g.nodes[n]
    op = OPS[d["op"]]
    ins = [g.nodes[u]["shape"] for u in inputs_of(g, n)]
    d["shape"] = tuple(op.shape(d["attrs"], ins))
    pad = getattr(d["attrs"], "pad", None)
    if pad is not None and len(ins[0]) == 3:
        a = d["attrs"]
        kernel = tuple(dl * (k - 1) + 1 for dl, k in zip(getattr(a, "dilation", (1, 1)), a.kernel))
        d["pads"] = resolve_pads(pad, ins[0][1], ins[0][2], kernel, getattr(a, "stride", None) or a.kernel)
    specs = op.params(d["attrs"], ins)
    d["param_specs"] = specs
    d["params"] = sum(math.prod(s.shape) for s in specs if not s.buffer)
    d["buffers"] = sum(math.prod(s.shape) for s in specs if s.buffer)
    d["macs"] = op.macs(d["attrs"], ins, d["shape"])


def renumber(g: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """Give nodes ids 0..n-1 in a topological order that keeps the old order where it can."""
    order = list(nx.lexicographical_topological_sort(g))
    mapping = {old: new for new, old in enumerate(order)}
    h = nx.relabel_nodes(g, mapping, copy=True)
    h.graph.update(g.graph)
    h.graph["input"] = mapping[g.graph["input"]]
    h.graph["output"] = mapping[g.graph["output"]]
    return h


def _report(g, pass_name: str, text: str, nodes_or_spans, refused=False) -> None:
    spans = [g.nodes[x]["span"] if isinstance(x, int) else x for x in nodes_or_spans]
    g.graph.setdefault("report", []).append(Record(pass_name, text, spans, refused))


def _from(d) -> list:
    """What a node stands for: itself, or the nodes fused into it."""
    return d.get("fused_from") or [(d["op"], d["name"], d["span"])]


# ---- the passes ---------------------------------------------------------------------------

def eliminate_dead(g, ctx):
    """Remove nodes whose result never reaches the output."""
    live = nx.ancestors(g, g.graph["output"]) | {g.graph["output"], g.graph["input"]}
    for n in sorted(set(g.nodes) - live, reverse=True):
        _report(g, "eliminate_dead", f"removed `{g.nodes[n]['name']}`: its result is never used", [n])
        _drop_params(g, n)
        g.remove_node(n)
    return renumber(g)


def _drop_params(g, n) -> None:
    params = g.graph.get("params")
    if params is not None:
        for spec in g.nodes[n].get("param_specs", []):
            params.pop(f"{g.nodes[n]['name']}.{spec.name}", None)


def _remove_passthrough(g, ctx, pass_name: str, modes: frozenset[str], why: str):
    for n in sorted(g.nodes):
        d = g.nodes[n]
        if modes <= OPS[d["op"]].identity_in:
            (src,) = inputs_of(g, n)
            _report(g, pass_name, f"removed {d['op']} `{d['name']}` ({why})", [n])
            bypass(g, n, src)
    return renumber(g)


def remove_identity(g, ctx):
    """Ops that are the identity in every mode."""
    return _remove_passthrough(g, ctx, "remove_identity", frozenset({"inference", "training"}),
                               "it passes its input through")


def remove_dropout(g, ctx):
    """Ops that are the identity at inference (dropout)."""
    return _remove_passthrough(g, ctx, "remove_dropout", frozenset({"inference"}), "an identity at inference")


def remove_flatten_before_dense(g, ctx):
    """A flatten whose every consumer flattens by itself (dense's `flatten` flag)."""
    for n in sorted(g.nodes):
        d = g.nodes[n]
        flag = OPS[d["op"]].absorbed_as
        if flag is None or n == g.graph["output"]:
            continue
        users = [v for v, _ in consumers(g, n)]
        if not users or any(flag not in OPS[g.nodes[v]["op"]].attrs.model_fields for v in users):
            continue
        (src,) = inputs_of(g, n)
        for v in users:
            g.nodes[v]["attrs"] = g.nodes[v]["attrs"].model_copy(update={flag: True})
        names = " + ".join(sorted({g.nodes[v]["op"] for v in users}))
        _report(g, "remove_flatten_before_dense", f"{d['op']} `{d['name']}` + {names} → {names} "
                                                  f"flattening its input", [n] + users)
        bypass(g, n, src)
    return renumber(g)


def fold_batchnorm(g, ctx):
    """Inference: a per-channel affine op (BatchNorm) after a conv or dense becomes new weights
    and a bias of that layer. The op table's `fold` gives y = (x − c)·s + t per channel; then
    W' = W · s (per output channel),  b' = (b − c) · s + t.
    """
    params = g.graph["params"]
    for n in sorted(g.nodes):
        if n not in g or OPS[g.nodes[n]["op"]].fold is None:
            continue
        bn = g.nodes[n]
        (src,) = inputs_of(g, n)
        prod = g.nodes[src]
        if OPS[prod["op"]].fused_as is None:
            _report(g, "fold_batchnorm", f"kept {bn['op']} `{bn['name']}`: its input comes from {prod['op']}, "
                                         "not a conv or dense to fold into", [n], refused=True)
            continue
        if len(consumers(g, src)) > 1:
            _report(g, "fold_batchnorm", f"kept {bn['op']} `{bn['name']}`: {prod['op']} `{prod['name']}` output "
                                         f"has {len(consumers(g, src))} consumers", [src, n], refused=True)
            continue
        own = {s.name: params[f"{bn['name']}.{s.name}"] for s in bn["param_specs"]}
        scale, center, shift = OPS[bn["op"]].fold(bn["attrs"], own)
        wname, bname = f"{prod['name']}.weight", f"{prod['name']}.bias"
        w = params[wname].astype(np.float64)
        b = params[bname].astype(np.float64) if prod["attrs"].bias else np.zeros(w.shape[0])
        params[wname] = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        params[bname] = ((b - center) * scale + shift).astype(np.float32)
        for s in bn["param_specs"]:
            params.pop(f"{bn['name']}.{s.name}", None)
        prod["attrs"] = prod["attrs"].model_copy(update={"bias": True})
        prod["fused_from"] = _from(prod) + _from(bn)
        refresh(g, src)
        _report(g, "fold_batchnorm", f"{prod['op']} + {_label(bn['op'])} → {prod['op']} with folded "
                                     f"{bn['op']} (`{prod['name']}`, `{bn['name']}`)", [src, n])
        bypass(g, n, src)
    return renumber(g)


def fuse_epilogue(g, ctx):
    """conv/dense [+ residual add] [+ element-wise activation] → one fused op, and a kept BatchNorm
    (`act_fused_as`) + element-wise activation → one fused op, where the backend runs it (its
    capability query, `ctx.fusion_refusal`)."""
    for n in sorted(g.nodes):
        if n not in g:
            continue
        d = g.nodes[n]
        op = OPS[d["op"]]
        target = (op.fused_as if op.pattern is Pattern.OUT_ELEMWISE_FUSABLE else None) or op.act_fused_as
        if target is None:
            continue
        takes_residual = "residual" in OPS[target].attrs.model_fields
        group, cur, residual = [n], n, None
        nxt = _single_consumer(g, cur)
        if nxt is None:
            if any(_epilogue_op(g, v, takes_residual) for v, _ in consumers(g, cur)):
                _report(g, "fuse_epilogue", f"not fused: {d['op']} `{d['name']}` output has "
                                            f"{len(consumers(g, cur))} consumers", [n], refused=True)
            continue
        if takes_residual and _is_residual_add(g, nxt, cur):
            residual = next(u for u in inputs_of(g, nxt) if u != cur)
            other = g.nodes[residual]
            if residual > n and OPS[other["op"]].fused_as == target and _single_consumer(g, residual) == nxt:
                continue  # both operands are convs: the later one (the main path) takes the add

            group.append(nxt)
            cur = nxt
            nxt = _single_consumer(g, cur)
        if nxt is not None and _elementwise(g, nxt):
            group.append(nxt)
        elif nxt is None and residual is not None and any(_elementwise(g, v) for v, _ in consumers(g, cur)):
            _report(g, "fuse_epilogue", f"activation not fused: `{g.nodes[cur]['name']}` output has "
                                        f"{len(consumers(g, cur))} consumers", [cur], refused=True)
        if len(group) == 1:
            continue
        why = ctx.fusion_refusal(target, tuple(g.nodes[x]["op"] for x in group))
        if why is not None:
            _report(g, "fuse_epilogue", f"not fused: {why}", group, refused=True)
            continue
        _fuse_group(g, group, target, residual)
    return renumber(g)


def _epilogue_op(g, v, takes_residual: bool) -> bool:
    return _elementwise(g, v) or (takes_residual and OPS[g.nodes[v]["op"]].residual_fusable)


def _is_residual_add(g, v, cur) -> bool:
    ins = inputs_of(g, v)
    return OPS[g.nodes[v]["op"]].residual_fusable and len(ins) == 2 and ins.count(cur) == 1


def _fuse_group(g, group: list[int], target: str, residual: int | None) -> None:
    head = g.nodes[group[0]]
    act = next((g.nodes[x] for x in group[1:] if _elementwise(g, x)), None)
    update = {"activation": "none", "act_args": ()}
    if act is not None:
        update = {"activation": act["op"], "act_args": formula_args(act["op"], act["attrs"])}
    if residual is not None or "residual" in OPS[target].attrs.model_fields:
        update["residual"] = residual is not None
    attrs = OPS[target].attrs(**{**head["attrs"].model_dump(), **update})
    fused_from = [item for x in group for item in _from(g.nodes[x])]
    label = "_".join(_label(op) for op, _, _ in fused_from)
    new = max(g.nodes) + 1
    meta = {k: head[k] for k in ("name", "local_name", "span", "callstack", "path")}
    g.add_node(new, op=target, attrs=attrs, fused_from=fused_from, **meta)
    srcs = inputs_of(g, group[0]) + ([residual] if residual is not None else [])
    for port, u in enumerate(srcs):
        g.add_edge(u, new, port=port)
    last = group[-1]
    for v, port in consumers(g, last):
        g.add_edge(new, v, port=port)
    if g.graph["output"] == last:
        g.graph["output"] = new
    _report(g, "fuse_epilogue", " + ".join(_label(op) for op, _, _ in fused_from) + f" → fused {label}",
            [x for x in group])
    for x in group:
        g.remove_node(x)
    refresh(g, new)


def _label(op: str) -> str:
    return OPS[op].label or op


def _gate_operand(g, n) -> int | None:
    """The port of a broadcast product's C×1×1 gate (the other operand C×H×W), or None."""
    shapes = [tuple(g.nodes[u]["shape"]) for u in inputs_of(g, n)]
    if len(shapes) != 2 or shapes[0] == shapes[1]:
        return None
    ports = [i for i, s in enumerate(shapes) if len(s) == 3 and s[1:] == (1, 1) and len(shapes[1 - i]) == 3]
    return ports[0] if len(ports) == 1 else None


def fuse_gate(g, ctx):
    """A broadcast product x · g (squeeze-excitation) whose C×1×1 gate g is the output of an op with
    an element-wise formula read by nothing else → one fused op (the product's `gate_fused_as`)
    computing x · act(g) in one pass; its inputs are the full tensor, then the activation's input."""
    for n in sorted(g.nodes):
        if n not in g:
            continue
        d = g.nodes[n]
        target = OPS[d["op"]].gate_fused_as
        port = _gate_operand(g, n) if target is not None else None
        if port is None:
            continue
        ins = inputs_of(g, n)
        gate, full = ins[port], ins[1 - port]
        if not _elementwise(g, gate):
            continue
        act = g.nodes[gate]
        if _single_consumer(g, gate) != n:
            _report(g, "fuse_gate", f"not fused: {act['op']} `{act['name']}` output has "
                                    f"{len(consumers(g, gate))} consumers", [gate, n], refused=True)
            continue
        ops = (act["op"], d["op"])
        why = ctx.fusion_refusal(target, ops)
        if why is not None:
            _report(g, "fuse_gate", f"not fused: {why}", [gate, n], refused=True)
            continue
        attrs = OPS[target].attrs(activation=act["op"], act_args=formula_args(act["op"], act["attrs"]))
        fused_from = _from(act) + _from(d)
        new = max(g.nodes) + 1
        meta = {k: d[k] for k in ("name", "local_name", "span", "callstack", "path")}
        g.add_node(new, op=target, attrs=attrs, fused_from=fused_from, **meta)
        g.add_edge(full, new, port=0)
        g.add_edge(inputs_of(g, gate)[0], new, port=1)
        for v, p in consumers(g, n):
            g.add_edge(new, v, port=p)
        if g.graph["output"] == n:
            g.graph["output"] = new
        labels = [_label(op) for op, _, _ in fused_from]
        _report(g, "fuse_gate", " + ".join(labels) + f" → fused {'_'.join(labels)}", [gate, n])
        g.remove_node(n)
        g.remove_node(gate)
        refresh(g, new)
    return renumber(g)


CHAIN = "elemwise_chain"  # the op fuse_elementwise makes


def fuse_elementwise(g, ctx):
    """Runs of unary element-wise ops with a single consumer between them → one elemwise_chain."""
    for n in sorted(g.nodes):
        if n not in g or not _elementwise(g, n):
            continue
        prev = inputs_of(g, n)[0]
        if _elementwise(g, prev) and _single_consumer(g, prev) == n:
            continue  # not the head of a run
        run, cur = [n], n
        while (nxt := _single_consumer(g, cur)) is not None and _elementwise(g, nxt):
            run.append(nxt)
            cur = nxt
        if len(run) < 2:
            continue
        ops = tuple(g.nodes[x]["op"] for x in run)
        why = ctx.fusion_refusal(CHAIN, ops)
        if why is not None:
            _report(g, "fuse_elementwise", f"not fused: {why}", run, refused=True)
            continue
        args = tuple(formula_args(g.nodes[x]["op"], g.nodes[x]["attrs"]) for x in run)
        head = g.nodes[run[0]]
        new = max(g.nodes) + 1
        meta = {k: head[k] for k in ("name", "local_name", "span", "callstack", "path")}
        g.add_node(new, op=CHAIN, attrs=OPS[CHAIN].attrs(ops=ops, args=args),
                   fused_from=[item for x in run for item in _from(g.nodes[x])], **meta)
        g.add_edge(inputs_of(g, run[0])[0], new, port=0)
        for v, port in consumers(g, run[-1]):
            g.add_edge(new, v, port=port)
        if g.graph["output"] == run[-1]:
            g.graph["output"] = new
        _report(g, "fuse_elementwise", " + ".join(ops) + f" → fused {'_'.join(ops)}", run)
        for x in run:
            g.remove_node(x)
        refresh(g, new)
    return renumber(g)


LAYOUT = "layout_transform"  # the op choose_layout inserts


def choose_layout(g, ctx):
    """Give every C×H×W tensor the layout its consumer's backend kernel wants (NCHW or NHWC),
    inserting layout_transform nodes where a producer and a consumer disagree and removing pairs
    that cancel."""
    prefer = ctx.layouts
    default = "NCHW"
    for n in sorted(g.nodes):
        d = g.nodes[n]
        ins = inputs_of(g, n)
        if d["op"] in prefer:
            want = prefer[d["op"]]
        elif OPS[d["op"]].pattern in (Pattern.ELEMWISE, Pattern.BROADCAST) and ins:
            want = g.nodes[ins[0]].get("layout") or default  # element-wise ops work in any layout
        else:
            want = default
        d["in_layout"] = want  # the layout this node reads its C×H×W inputs in
        d["layout"] = want if len(d["shape"]) == 3 else None  # and writes its output in
    if all(g.nodes[n]["layout"] in (None, default) and g.nodes[n]["in_layout"] == default for n in g.nodes):
        return g
    for u in sorted(g.nodes):
        lu = g.nodes[u]["layout"]
        if lu is None:
            continue
        by_layout: dict[str, list[tuple[int, int]]] = {}
        for v, port in consumers(g, u):
            lv = g.nodes[v]["in_layout"]
            if lv != lu:
                by_layout.setdefault(lv, []).append((v, port))
        for lv, uses in by_layout.items():  # one transform per producer and layout, shared by its users
            t = max(g.nodes) + 1
            src = g.nodes[u]
            g.add_node(t, op=LAYOUT, attrs=OPS[LAYOUT].attrs(to=lv), layout=lv, in_layout=lu,
                       name=f"{src['name']}.to_{lv.lower()}", local_name=f"to_{lv.lower()}", span=src["span"],
                       callstack=src["callstack"], path=src["path"], shape=src["shape"])
            g.add_edge(u, t, port=0)
            for v, port in uses:
                key = next(k for k, dd in g.get_edge_data(u, v).items() if dd["port"] == port)
                g.remove_edge(u, v, key=key)
                g.add_edge(t, v, port=port)
            refresh(g, t)
    _cancel_transforms(g)
    return renumber(g)


def _cancel_transforms(g) -> None:
    inserted = removed = 0
    for n in sorted(g.nodes):
        if n not in g or g.nodes[n]["op"] != LAYOUT:  # the transforms this pass inserted
            continue
        inserted += 1
        (src,) = inputs_of(g, n)
        if g.nodes[src]["op"] == LAYOUT and _single_consumer(g, src) == n:
            (origin,) = inputs_of(g, src)
            bypass(g, n, origin)
            g.remove_node(src)
            removed += 2
    if inserted:
        _report(g, "choose_layout", f"{inserted - removed} layout transforms inserted "
                                    f"({removed} cancelled in pairs)", [])


def plan_memory(g, ctx):
    """Liveness over the schedule (node ids) and a first-fit arena: every activation gets an
    offset; tensors whose lifetimes do not overlap share memory, and an element-wise op writes
    over its input when that input dies there (in place). For training, forward tensors stay
    alive until the backward step that needs them (op table `grad_needs`) and each gradient
    lives from the backward step that makes it to the one that consumes it."""
    intervals, shares = _lifetimes(g, ctx.batch, ctx.mode == "training")
    merged = _merge_shared(intervals, shares)
    offsets = _first_fit(merged)
    planned = max((offsets[k] + v[2] for k, v in merged.items()), default=0)
    naive = sum(nb for _, _, nb, _ in intervals)
    live_peak = _peak(merged)
    for k, off in offsets.items():
        if k[0] == "act":
            g.nodes[k[1]]["buffer_offset"] = off
    for k, root in shares.items():
        g.nodes[k[1]]["buffer_offset"] = offsets[_root(root, shares)]
        g.nodes[k[1]]["in_place"] = True
    g.graph["memory"] = {"mode": ctx.mode, "batch": ctx.batch, "unplanned_bytes": naive, "planned_bytes": planned,
                         "peak_live_bytes": live_peak, "in_place": len(shares), "tensors": len(intervals)}
    return g


def activation_peak(g, batch: int, training: bool) -> int:
    """Bytes of activations (and, for training, their gradients) alive at once at `batch`, under
    the lifetimes plan_memory plans with: what running the graph needs, without the arena."""
    intervals, shares = _lifetimes(g, batch, training)
    return _peak(_merge_shared(intervals, shares))


def _lifetimes(g, batch: int, training: bool):
    """(start, end, bytes, key) per activation (and gradient), and the in-place sharing map."""
    n_nodes = max(g.nodes) + 1
    size = {n: math.prod(g.nodes[n]["shape"]) * batch * 4 for n in g.nodes}
    intervals: list[tuple[int, int, int, object]] = []  # (start, end, bytes, key)
    shares: dict[object, object] = {}
    for n in sorted(g.nodes):
        users = [v for v, _ in consumers(g, n)]
        end = max(users, default=n)
        if n == g.graph["output"]:
            end = 2 * n_nodes if training else n_nodes
        if training:
            op = OPS[g.nodes[n]["op"]]
            needers = ([n] if "output" in op.grad_needs else []) + [
                v for v in users if "input" in OPS[g.nodes[v]["op"]].grad_needs]
            if needers:
                end = max(end, 2 * n_nodes - min(needers))  # backward of node k runs at time 2N − k
        intervals.append((n, end, size[n], ("act", n)))
        if training and n != g.graph["input"] and users:
            # d(output of n) appears at the backward of its last user and dies at n's own backward
            intervals.append((2 * n_nodes - max(users), 2 * n_nodes - n, size[n], ("grad", n)))
        if not training and users and OPS[g.nodes[n]["op"]].pattern is Pattern.ELEMWISE:
            src = inputs_of(g, n)[0]
            if max(v for v, _ in consumers(g, src)) == n and size[src] == size[n] and src != g.graph["input"]:
                shares[("act", n)] = ("act", src)  # in place over its input
    return intervals, shares


def _merge_shared(intervals, shares) -> dict[object, list]:
    merged: dict[object, list] = {}
    for start, end, nbytes, key in intervals:
        root = key
        while root in shares:
            root = shares[root]
        if root in merged:
            merged[root][1] = max(merged[root][1], end)
        else:
            merged[root] = [start, end, nbytes]
    return merged


def _root(k, shares):
    while k in shares:
        k = shares[k]
    return k


def _first_fit(items: dict) -> dict:
    """Offsets for [start, end, bytes] items: larger first, each at the lowest address free for its lifetime."""
    placed: list[tuple[int, int, int, int]] = []  # (offset, bytes, start, end)
    out = {}
    for key, (start, end, nbytes) in sorted(items.items(), key=lambda kv: (-kv[1][2], kv[1][0])):
        busy = sorted((o, o + b) for o, b, s, e in placed if not (e < start or end < s))
        offset = 0
        for lo, hi in busy:
            if offset + nbytes <= lo:
                break
            offset = max(offset, hi)
        placed.append((offset, nbytes, start, end))
        out[key] = offset
    return out


def _peak(items: dict) -> int:
    events = []
    for start, end, nbytes in items.values():
        events += [(start, 0, nbytes), (end, 1, -nbytes)]
    live = peak = 0
    for _, _, delta in sorted(events):
        live += delta
        peak = max(peak, live)
    return peak

