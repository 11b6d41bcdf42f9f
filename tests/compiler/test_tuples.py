"""Tuples in `.cnn` expressions: indexing `t[i]` (tuples and sizes), `len(t)`, loops over a tuple with
unpacking (`for t, c, n, s in ((1, 16, 1, 1), ...)`, MobileNetV2's settings table), and located errors."""

from __future__ import annotations

import pytest

from cnnc.compiler.pipeline import run_pipeline
from cnnc.dsl import load_text
from cnnc.dsl.errors import CnncError, CnncErrors


def build(body: str, blocks: str = ""):
    text = f"network t\ninput 3x8x8\n{blocks}layers:\n{body}"
    return run_pipeline(load_text(text, "t.cnn"))


def conv_filters(g) -> list[int]:
    return [d["attrs"].filters for _, d in sorted(g.nodes(data=True)) if d["op"] == "conv"]


def errors(body: str, blocks: str = "") -> list[tuple[int, int, str, str | None]]:
    with pytest.raises((CnncErrors, CnncError)) as info:
        build(body, blocks)
    found = info.value.errors if isinstance(info.value, CnncErrors) else [info.value]
    return [(e.span.line, e.span.col, e.message, e.hint) for e in found]


@pytest.mark.parametrize("expr,value", [
    ("(4, 8, 16)[0]", 4), ("(4, 8, 16)[2]", 16), ("(4, 8, 16)[-1]", 16), ("(4, 8, 16)[-3]", 4),
    ("((1, 2), (3, 24))[1][1]", 24), ("(4, 8)[1] * 2 + 1", 17), ("len((4, 8, 16))", 3), ("len(3x5)", 2),
    ("(6, 7)[len((1,)) ]", 7), ("-(4, 8)[0] + 12", 8),
])
def test_index_and_len_values(expr, value):
    assert conv_filters(build(f"    conv({expr}, 1x1)\n")) == [value]


def test_index_in_the_command_form_and_on_sizes():
    blocks = "block b(cfg, k=5x3):\n    conv(cfg[1], (k[0], 1), pad=(k[0]//2, 0)) -> conv cfg[-1] 1x1\n"
    g = build("    b((2, 12, 6))\n", blocks)
    assert conv_filters(g) == [12, 6]
    conv1 = next(d for _, d in g.nodes(data=True) if d["op"] == "conv")
    assert tuple(conv1["attrs"].kernel) == (5, 1) and tuple(conv1["attrs"].pad) == (2, 2, 0, 0)  # top, bottom, left, right
    assert g.nodes[next(n for n, d in g.nodes(data=True) if d["op"] == "conv")]["shape"] == (12, 8, 8)


def test_loop_over_a_settings_table_with_unpacking():
    body = ("    for t, c, n, s in (\n"
            "            (1, 16, 1, 1),     # expansion, width, repeats, stride\n"
            "            (6, 24, 2, 2),\n"
            "    ):\n"
            "        for i in range(n):\n"
            "            conv c * t 1x1 -> relu\n")
    assert conv_filters(build(body)) == [16, 144, 144]


def test_loop_over_a_tuple_and_restores_names():
    blocks = "block b(c):\n    for c in (c, 2 * c):\n        conv c 1x1\n    conv c 1x1\n"
    assert conv_filters(build("    b(4)\n", blocks)) == [4, 8, 4]  # the parameter `c` is back after the loop
    assert conv_filters(build("    for c in (5,):\n        conv c 1x1\n")) == [5]


@pytest.mark.parametrize("body,blocks,line,col,message,hint", [
    ("    conv (4, 8)[2] 1x1\n", "", 4, 16, "syntax error: unexpected `[`", None),  # the call form: conv(...) reads as a call
    ("    b((4, 8))\n", "block b(t):\n    conv t[2] 1x1\n", 4, 12, "index 2 is out of range for (4, 8), which has 2 items",
     "indices run from 0 to 1 (or from -2 to -1 from the end)"),
    ("    b((4, 8))\n", "block b(t):\n    conv t[-3] 1x1\n", 4, 12, "index -3 is out of range", None),
    ("    b((4, 8))\n", "block b(t):\n    conv t[0.5] 1x1\n", 4, 12, "an index must be an integer, got 0.5", None),
    ("    b(4)\n", "block b(t):\n    conv t[0] 1x1\n", 4, 10, "only a tuple or a size can be indexed, got 4", None),
    ("    conv q[0] 1x1\n", "", 4, 10, "`q` is not defined", None),
    ("    conv len(4) 1x1\n", "", 4, 14, "a tuple or a size is needed here, got 4", None),
    ("    for a, b in ((1, 2), (3,)):\n        relu\n", "", 4, 17,
     "item 1 of the loop, (3,), does not unpack into the 2 names a, b: 1 value", None),
    ("    for a, b in ((1, 2), 3):\n        relu\n", "", 4, 17, "item 1 of the loop, 3, does not unpack", None),
    ("    for q in 5:\n        relu\n", "", 4, 14, "a loop runs over a tuple or `range(...)`, got 5",
     "`for c in (16, 24, 32):` or `for i in range(3):`"),
    ("    for q in nothing:\n        relu\n", "", 4, 14, "`nothing` is not defined", None),
    ("    for conv in (1, 2):\n        relu\n", "", 4, 5, "`conv` names a layer or block", None),
])
def test_misuse_is_a_located_error(body, blocks, line, col, message, hint):
    found = errors(body, blocks)
    assert any(l_ == line and c == col and message in m and (hint is None or h == hint)
               for l_, c, m, h in found), found


def test_arithmetic_on_a_size_explains_itself():
    (line, col, message, hint), = errors("    conv 4 3x3 pad=3x3//2\n")
    assert (line, col, message) == (4, 20, "arithmetic needs numbers, got 3x3")
    assert "repetition" not in hint and "`3x3[0]` is 3" in hint and "pad=same" in hint
    (_, _, _, hint), = errors("    conv 4 3x3 pad=1 * 3x3\n")
    assert "repetition `* N`" in hint  # `... 3x3 * 2` looks like an attempt to repeat a layer
    (_, _, _, hint), = errors("    conv 4 3x3 pad=(1, 1) + 1\n")
    assert "`(1, 1)[0]` is 1" in hint and "pad=same" not in hint
