"""`if`/`elif`/`else`, comparisons, `range` with a step and `* 0`: what they build, and their errors."""

from __future__ import annotations

import pytest

from cnnc.compiler.pipeline import run_pipeline
from cnnc.dsl import load_text
from cnnc.dsl.errors import CnncError, CnncErrors

BLOCK = """\
network t
input 16x8x8
block unit(c_in, c, stride, expand, act=true):
    x = in
    if expand != 1:
        conv c_in * expand 1x1 -> relu6
    elif stride > 1:
        maxpool 1 stride=1
    else:
        identity
    y = conv c 3x3 pad=1 stride=stride round=floor
    if stride == 1:
        if c_in == c:
            add(x, y)
    if act:
        relu
layers:
"""


def ops(layers: str, header: str = BLOCK) -> list[str]:
    g = run_pipeline(load_text(header + layers, "t.cnn"))
    return [d["op"] for _, d in sorted(g.nodes(data=True))][1:]


def test_branches_build_what_their_conditions_choose():
    assert ops("    unit(16, 16, 1, 6)\n") == ["conv", "relu6", "conv", "add", "relu"]
    assert ops("    unit(16, 32, 2, 1)\n") == ["maxpool", "conv", "relu"]
    assert ops("    unit(16, 16, 1, 1, act=false)\n") == ["identity", "conv", "add"]


def test_comparisons_of_numbers_words_and_sizes():
    header = "network t\ninput 3x8x8\nblock b(p, k=3x3, n=2.5):\n"
    body = ("    if p == same:\n        conv 4 k pad=p\n    if k != 1x1:\n        relu\n"
            "    if n >= 2.5:\n        tanh\n    if n < 2:\n        sigmoid\n")
    assert ops("    b(same)\n", header + body + "layers:\n") == ["conv", "relu", "tanh"]
    assert ops("    b(valid, k=1x1, n=1)\n", header + body + "layers:\n") == ["sigmoid"]


@pytest.mark.parametrize("cond,taken", [
    ("s == 1 and c == 3", True), ("s == 2 and c == 3", False), ("s == 2 or c == 3", True),
    ("not c > 1", False), ("s == 2 or not c == 4 and c < 5", True), ("(s == 2 or c == 3) and s > 5", False),
    ("c > 0 and 64 // (c - 3) > 2", None),  # c − 3 = 0: the right side runs, and divides by zero
    ("c < 0 and 64 // (c - 3) > 2", False),  # short-circuit: never evaluated
    ("s == 1 or 1 // 0 > 0", True),
])
def test_and_or_not(cond, taken):
    net = f"network t\ninput 3x8x8\nblock b(s, c):\n    if {cond}:\n        relu\nlayers:\n    b(1, 3)\n"
    if taken is None:
        with pytest.raises(CnncErrors) as info:
            run_pipeline(load_text(net, "t.cnn"))
        assert "division by zero" in info.value.errors[0].message
        return
    g = run_pipeline(load_text(net, "t.cnn"))
    assert any(d["op"] == "relu" for _, d in g.nodes(data=True)) == taken


def test_range_steps_and_repeat_zero():
    net = "network t\ninput 3x8x8\nlayers:\n    for i in range(6, 0, -2):\n        conv i 1x1\n    (relu) * 0\n"
    g = run_pipeline(load_text(net, "t.cnn"))
    assert [d["attrs"].filters for _, d in sorted(g.nodes(data=True)) if d["op"] == "conv"] == [6, 4, 2]
    assert not any(d["op"] == "relu" for _, d in g.nodes(data=True))


@pytest.mark.parametrize("layers,message,line,col", [
    ("    if c > 2:\n        relu\n", "`c` is not defined", 4, 8),
    ("    if 3:\n        relu\n", "a condition must be true or false, got 3", 4, 8),
    ("    if same > 1:\n        relu\n", "`>` compares numbers, got same", 4, 8),
    ("    for i in range(0, 4, 0):\n        relu\n", "range step must not be zero", 4, 26),
    ("    (relu) * -1\n", "repeat count must be between 0 and 20000, got -1", 4, 14),
    ("    if 1 > 0\n        relu\n", "syntax error", 4, 13),
    ("    if not 3:\n        relu\n", "a condition must be true or false, got 3", 4, 12),
    ("    if 1 > 0 and same:\n        relu\n", "`same` is not defined", 4, 18),
])
def test_misuse_is_a_located_error(layers, message, line, col):
    with pytest.raises((CnncErrors, CnncError)) as info:
        run_pipeline(load_text("network t\ninput 3x8x8\nlayers:\n" + layers, "t.cnn"))
    err = info.value.errors[0] if isinstance(info.value, CnncErrors) else info.value
    assert message in err.message, err.message
    assert (err.span.line, err.span.col) == (line, col)


def test_a_branch_not_taken_builds_nothing_but_must_parse():
    net = "network t\ninput 3x8x8\nlayers:\n    if 1 > 2:\n        conv 1//0 3x3\n    relu\n"
    assert [d["op"] for _, d in run_pipeline(load_text(net, "t.cnn")).nodes(data=True)] == ["input", "relu"]
