"""`in.channels` and the other sizes of a tensor in expressions: values, defaults, errors."""

from __future__ import annotations

import pytest

from cnnc.compiler.pipeline import run_pipeline
from cnnc.dsl import load_text
from cnnc.dsl.errors import CnncErrors

NET = """\
network t
input 3x16x8
block se(c=in.channels, r=4):
    x = in
    gap -> conv max(8, c // r) 1x1 -> relu -> conv c 1x1 -> hardsigmoid -> mul(x)
block res(c):
    x = in
    y = conv c 3x3 pad=1 -> bn
    if in.channels == c:
        add(x, y)
    else:
        z = x -> conv c 1x1
        add(z, y)
layers:
"""


def build(layers: str):
    return run_pipeline(load_text(NET + layers, "t.cnn"))


def test_sizes_of_the_flowing_and_named_tensors():
    g = build("    a = conv 24 3x3 pad=1 -> se -> res(24) -> res(32)\n"
              "    conv a.channels + in.channels a.height // 4 -> gap -> dense a.features // a.width\n")
    convs = [d["attrs"] for _, d in sorted(g.nodes(data=True)) if d["op"] == "conv"]
    assert [a.filters for a in convs] == [24, 8, 24, 24, 32, 32, 35]  # se's gate: max(8, 24 // 4)
    assert convs[-1].kernel == (4, 4)
    dense = next(d["attrs"] for _, d in g.nodes(data=True) if d["op"] == "dense")
    assert dense.units == 32 * 16 * 8 // 8
    adds = [n for n, d in g.nodes(data=True) if d["op"] == "add"]
    assert len(adds) == 2 and g.nodes[adds[1]]["shape"] == (32, 16, 8)  # res(32) projected its shortcut


@pytest.mark.parametrize("layers,message,col", [
    ("    conv in.depth 1x1\n", "a tensor has no `depth`", 13),
    ("    gap -> dense 4 -> dense in.height\n", "", 0),  # `in` is the network input here: fine
    ("    x = gap -> dense 4\n    dense x.height\n", "`x` is flat (4 features): it has no height", 11),
    ("    dense q.channels\n", "unknown tensor `q`", 11),
])
def test_misuse_is_located(layers, message, col):
    if not message:
        build(layers)
        return
    with pytest.raises(CnncErrors) as info:
        build(layers)
    err = info.value.errors[0]
    assert message in err.message, err.message
    assert err.span.col == col


def test_a_shape_mistake_before_it_is_reported_once_at_its_own_line():
    with pytest.raises(CnncErrors) as info:
        build("    x = conv 4 5x5 stride=2\n    conv x.channels 1x1\n")
    assert len(info.value.errors) == 1 and "not an integer" in info.value.errors[0].message
    assert info.value.errors[0].span.line == 15
