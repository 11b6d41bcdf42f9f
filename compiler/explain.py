"""What `cnnc check --explain` shows: the arithmetic behind each layer's output size, parameter
count and receptive field, written out as the classic notes teach it.

For every layer the op table gives a sliding window (OpDef.slides): the output-size rule
(W − F + 2P)/S + 1 with its numbers (per axis where height and width differ; a dilated kernel as
its extent F' = D(F − 1) + 1), the rounding the layer applies, and the padding that would make
the division exact or give ⌈N/S⌉ (with stride 1, keep the size: P = (F − 1)/2). For every layer
with parameters, their count: the table's params_doc with the numbers. For every layer with a
window (OpDef.window), the receptive field's growth r_out = r_in + (F' − 1)·j_in, j_out = j_in·S.

The numbers come from the code that infers shapes and counts (ops.Slide, the shape rules,
passes.grow_receptive_field); a suggested padding is checked by the layer's own shape rule.
"""

from __future__ import annotations

import networkx as nx

from cnnc.dsl.errors import CnncError, InternalError, did_you_mean

from .graph import inputs_of
from .ops import GLOBAL, OPS, Slide, Window, fmt_shape, resolve_pads
from .passes import grow_receptive_field, receptive_input
from .summary import describe

RULES = ("sizes by (W − F + 2P)/S + 1 (F' = D(F − 1) + 1 for a dilated kernel); receptive fields by "
         "r_out = r_in + (F' − 1)·j_in, j_out = j_in·S, in input pixels")


def explain(g: nx.MultiDiGraph, layer: str | None = None) -> list[dict]:
    """One entry per layer that has a window or parameters, or the entries of `layer` (a dotted layer
    name, or a block instance: all its layers). An unknown name is a CnncError with the close ones."""
    if layer is None:
        return [e for n in sorted(g.nodes) if (e := explain_layer(g, n)) is not None]
    chosen = [n for n in sorted(g.nodes) if g.nodes[n]["name"] == layer]
    if not chosen:
        chosen = [n for n in sorted(g.nodes) if (".".join(g.nodes[n]["path"]) + ".").startswith(layer + ".")]
    if not chosen:
        names = [g.nodes[n]["name"] for n in sorted(g.nodes)] + [".".join(p) for p in g.graph["blocks"]]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        hint = did_you_mean(layer, names) or f"its layers: {shown}"
        source = getattr(g.graph["source"], "name", g.graph["source"])
        raise CnncError(f"{source}: --explain: no layer or block instance named `{layer}`", hint=hint)
    out = [e for n in chosen if (e := explain_layer(g, n)) is not None]
    if not out:  # a layer with neither window nor parameters: say so rather than print nothing
        d = g.nodes[chosen[0]]
        out = [_header(g, chosen[0]) | {"text": _title(g, chosen[0]) + f"\n  {d['op']} has no sliding window "
                                        "and no parameters; its receptive field is its input's"}]
    return out


def explain_layer(g: nx.MultiDiGraph, n: int) -> dict | None:
    """Node n's arithmetic as data with its rendered text, or None when it has no window and no parameters."""
    d = g.nodes[n]
    op = OPS[d["op"]]
    srcs = inputs_of(g, n)
    if not srcs:
        return None
    ins = [g.nodes[u]["shape"] for u in srcs]
    win = op.window(d["attrs"], ins)
    specs = d["param_specs"]
    if win is None and not specs:
        return None
    entry = _header(g, n)
    lines = [_title(g, n)]
    if op.slides is not None and len(ins[0]) == 3:
        slides = op.slides(d["attrs"], ins)
        entry["size"] = [_axis(sl, axis) for sl, axis in zip(slides, ("height", "width"))]
        if _same_axes(slides):
            lines.append(f"  size     {_axis_text(slides[0], 'W')}")
        else:
            lines += [f"  size     height {_axis_text(slides[0], 'H')}",
                      f"           width  {_axis_text(slides[1], 'W')}"]
        entry["padding"] = _padding(op, d["attrs"], ins, slides)
        lines += [f"  padding  {p['text']}" if i == 0 else f"           {p['text']}"
                  for i, p in enumerate(entry["padding"])]
    if specs:
        entry["params"] = _params(op, d, ins)
        lines.append(f"  params   {entry['params']['text']}")
        if entry["params"]["buffers"]:
            lines.append(f"  buffers  {entry['params']['buffers_text']}")
    if win is not None:
        entry["rf"] = _rf(receptive_input(g, n, srcs), win, d["rf"])
        lines.append(f"  RF       {entry['rf']['text']}")
    entry["text"] = "\n".join(lines)
    return entry


def render(g: nx.MultiDiGraph, entries: list[dict]) -> str:
    """The entries' text under a line naming the network and the rules used."""
    return "\n\n".join([f"network {g.graph['network']}: {RULES}"] + [e["text"] for e in entries])


# ---- the parts of an entry --------------------------------------------------------------------

def _header(g, n) -> dict:
    d = g.nodes[n]
    ins = [g.nodes[u]["shape"] for u in inputs_of(g, n)]
    return {"name": d["name"], "op": d["op"], "line": d["span"].line, "file": d["span"].file,
            "inputs": [list(s) for s in ins], "shape": list(d["shape"])}


def _title(g, n) -> str:
    d = g.nodes[n]
    ins = [fmt_shape(g.nodes[u]["shape"]) for u in inputs_of(g, n)]
    return (f"{d['name']}: {describe(d['op'], d['attrs'])}, {' + '.join(ins)} → {fmt_shape(d['shape'])}"
            f"  (line {d['span'].line})")


def _same_axes(slides: tuple[Slide, Slide]) -> bool:
    h, w = slides
    return (h.n, h.kernel, h.dilation, h.stride, h.p0, h.p1) == (w.n, w.kernel, w.dilation, w.stride, w.p0, w.p1)


def _axis(sl: Slide, axis: str) -> dict:
    return {"axis": axis, "n": sl.n, "kernel": sl.kernel, "dilation": sl.dilation, "extent": sl.extent,
            "stride": sl.stride, "pad": [sl.p0, sl.p1], "rounding": sl.rounding, "rule": sl.rule,
            "value": sl.span / sl.stride + 1, "out": sl.size(axis, "explain"), "arithmetic": sl.arith(),
            "text": _axis_text(sl, "H" if axis == "height" else "W")}


def _axis_text(sl: Slide, symbol: str) -> str:
    """`(W − F + 2P)/S + 1 = (227 − 11 + 2·0)/4 + 1 = 55, a whole number (round=exact)`."""
    f = "F'" if sl.dilation > 1 else "F"
    pads = "2P" if sl.p0 == sl.p1 else "P0 + P1"
    rule = f"({symbol} − {f} + {pads})/S + 1"
    if sl.dilation > 1:
        rule = f"F' = D(F − 1) + 1 = {sl.dilation}·({sl.kernel} − 1) + 1 = {sl.extent}; " + rule
    value, out = f"{sl.span / sl.stride + 1:.4g}", sl.size("", "explain")
    text = f"{rule} = {sl.arith()} = "
    if sl.pad_word == "same":
        how = f"pad=same pads {sl.p0} + {sl.p1} for ⌈{sl.n}/{sl.stride}⌉ = {out}"
    elif sl.pad_word == "valid":
        how = "pad=valid: P = 0"
    else:
        how = sl.rule
    if sl.span % sl.stride == 0:
        return text + f"{out}, a whole number ({how})"
    left = sl.span % sl.stride
    if sl.rounding == "floor":
        return text + (f"{value} → ⌊{value}⌋ = {out} ({how}: the last {left} pixel"
                       f"{'s' if left != 1 else ''} fit no window)")
    if sl.ceil_dropped():
        return text + (f"{value} → ⌈{value}⌉ = {sl.ceil_size()} → {out} ({how}, PyTorch's ceil_mode=True; the "
                       "last window would start in the end padding and is dropped)")
    return text + f"{value} → ⌈{value}⌉ = {out} ({how}, PyTorch's ceil_mode=True)"


def _padding(op, attrs, ins, slides: tuple[Slide, Slide]) -> list[dict]:
    """The padding that makes the division exact, and the one that gives ⌈N/S⌉ (stride 1: keeps the
    size), each checked by the layer's shape rule; none for a layer without a `pad` attribute."""
    if "pad" not in type(attrs).model_fields:
        return []
    h, w = slides
    out = []
    if all(sl.span % sl.stride == 0 for sl in slides):
        out.append({"kind": "exact", "pads": [h.p0, h.p1, w.p0, w.p1], "ok": True,
                    "text": "exact as written: the last window ends on the last (padded) pixel"})
    else:
        pads = []
        for sl in slides:
            total = _nearest_exact(sl)
            pads += [total // 2, total - total // 2]
        out.append(_suggest(op, attrs, ins, slides, tuple(pads), "exact",
                            "exact (no rounding) with the total padding P0 + P1 nearest the written one"))
    keep = resolve_pads("same", ins[0][1], ins[0][2], (h.extent, w.extent), (h.stride, w.stride))
    if all(sl.stride == 1 for sl in slides) and h.extent % 2 and w.extent % 2:
        f = "F'" if h.dilation > 1 or w.dilation > 1 else "F"
        why = (f"keeps the size with P = ({f} − 1)/2 = ({h.extent} − 1)/2 = {keep[0]}" if h.extent == w.extent else
               f"keeps the size with P = ({f} − 1)/2 per axis = {keep[0]}, {keep[2]}")
    else:
        why = "; ".join(f"⌈{sl.n}/{sl.stride}⌉ = {-(-sl.n // sl.stride)} needs P0 + P1 = "
                        f"max(({-(-sl.n // sl.stride)} − 1)·{sl.stride} + {sl.extent} − {sl.n}, 0) = {p0 + p1}"
                        for sl, (p0, p1) in zip(slides if not _same_axes(slides) else slides[:1],
                                                (keep[:2], keep[2:])))
        why += " (pad=same)"
    out.append(_suggest(op, attrs, ins, slides, keep, "keep", why))
    return out


def _nearest_exact(sl: Slide) -> int:
    """The total padding nearest the written one (the smaller on a tie) that makes (N − F + P0 + P1)/S whole."""
    written = sl.p0 + sl.p1
    for t in sorted(range(written + sl.stride + 1), key=lambda t: (abs(t - written), t)):
        if (sl.n + t - sl.extent) % sl.stride == 0 and sl.n + t >= sl.extent:
            return t
    raise InternalError(f"no exact padding for {sl}")


def _suggest(op, attrs, ins, slides, pads: tuple[int, int, int, int], kind: str, why: str) -> dict:
    """A padding and what the layer's shape rule makes of it (it may refuse: a pool's pad ≤ kernel/2)."""
    current = (slides[0].p0, slides[0].p1, slides[1].p0, slides[1].p1)
    spelled = _pad_text(pads)
    update = {"pad": pads} | ({"round": "exact"} if kind == "exact" and "round" in type(attrs).model_fields else {})
    try:
        shape = op.shape(attrs.model_copy(update=update), ins)
    except CnncError as err:
        return {"kind": kind, "pads": list(pads), "ok": False,
                "text": f"{why}: pad={spelled}, which {op.name} refuses ({err.message})"}
    here = ", as written" if pads == current else ""
    return {"kind": kind, "pads": list(pads), "ok": True, "shape": list(shape),
            "text": f"{why}: pad={spelled} → {fmt_shape(shape[1:])}{here}"}


def _pad_text(p: tuple[int, int, int, int]) -> str:
    """A padding as a .cnn file writes it: `2`, `(1, 2)` (height, width) or `(top, bottom, left, right)`."""
    t, b, l, r = p
    if t == b == l == r:
        return str(t)
    if t == b and l == r:
        return f"({t}, {l})"
    return f"({t}, {b}, {l}, {r})"


def _params(op, d, ins) -> dict:
    """The count as the table's formula, its numbers and the total; buffers likewise."""
    specs = d["param_specs"]
    trained = [s for s in specs if not s.buffer]
    buffers = [s for s in specs if s.buffer]
    formula, _, buffer_formula = op.params_doc.partition("; buffers ")
    numbers = (op.params_text(d["attrs"], ins) if op.params_text is not None and trained else
               " + ".join("·".join(map(str, s.shape)) for s in trained) or "0")
    text = f"{formula} = {numbers} = {d['params']:,}" if formula not in ("", "0") else f"{numbers} = {d['params']:,}"
    out = {"formula": formula, "numbers": numbers, "total": d["params"], "text": text, "buffers": d["buffers"],
           "tensors": {s.name: list(s.shape) for s in specs}}
    if buffers:
        b_numbers = " + ".join("·".join(map(str, s.shape)) for s in buffers)
        out["buffers_text"] = (f"{buffer_formula} = " if buffer_formula else "") + f"{b_numbers} = {d['buffers']:,}" \
            + " (" + ", ".join(s.name for s in buffers) + "; not trained)"
    return out


def _rf(rf_in, win, rf_out) -> dict:
    """The receptive field's growth through one window: r_out = r_in + (F' − 1)·j_in, j_out = j_in·S."""
    if rf_out != grow_receptive_field(rf_in, win):
        raise InternalError(f"receptive field {rf_out} is not the growth of {rf_in} by {win}")
    data = {"in": rf_in if rf_in == GLOBAL else list(rf_in), "out": rf_out if rf_out == GLOBAL else list(rf_out),
            "window": win if win == GLOBAL else [win.kh, win.kw, win.sh, win.sw]}
    if rf_in == GLOBAL:
        return data | {"text": "global: its input already depends on the whole image"}
    if win == GLOBAL:
        return data | {"text": f"global: it reads every position of its input (whose field was {rf_in[0]}"
                               + (f"x{rf_in[1]}" if rf_in[1] != rf_in[0] else "") + ")"}
    assert isinstance(win, Window)
    axes = [(rf_in[0], rf_in[2], win.kh, win.sh), (rf_in[1], rf_in[3], win.kw, win.sw)]
    texts = [f"r = {r} + ({f} − 1)·{j} = {r + (f - 1) * j}, j = {j}·{s} = {j * s}" for r, j, f, s in axes]
    text = texts[0] if texts[0] == texts[1] else f"height {texts[0]}; width {texts[1]}"
    return data | {"text": text}
