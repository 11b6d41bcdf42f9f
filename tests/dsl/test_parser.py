"""The parser: syntax tree shapes and spans, expressions, continuation lines, comments."""

from __future__ import annotations

import pytest

from cnnc.dsl import ast, parse
from cnnc.dsl.errors import CnncError

SRC = """\
# a comment line
network tiny   # trailing comment
input image: 3x32x32
classes 10
default conv bias=false

block unit(c, stride=1):
    short = in -> conv c 1x1 stride=stride
    conv c 3x3 stride=stride pad=same ->
        bn -> relu
    add(short)

layers:
    conv 16 3x3 pad=1
    unit(32, stride=2) * 2
    (conv 8 1x7 pad=(0,0,3,3) -> relu) × 2
    for i in range(1, 3):
        unit(8*i)
    gap -> dense classes
train:
    lr 0.1 policy=step step_size=30
"""


def test_program_parts():
    p = parse(SRC, "tiny.cnn")
    assert p.network[0] == "tiny"
    assert p.input_name == "image" and p.input_dims[0] == (3, 32, 32)
    assert isinstance(p.classes[0], ast.Num) and p.classes[0].value == 10
    assert [d.op for d in p.defaults] == ["conv"]
    assert list(p.blocks) == ["unit"]
    assert [s.name for s in p.train] == ["lr"]
    assert len(p.layers) == 5


def test_block_params_and_defaults():
    unit = parse(SRC).blocks["unit"]
    assert [(q.name, q.default.value if q.default else None) for q in unit.params] == [("c", None), ("stride", 1)]
    assert isinstance(unit.body[0], ast.Assign) and unit.body[0].name == "short"


def test_trailing_arrow_continues_the_line():
    unit = parse(SRC).blocks["unit"]
    chain = unit.body[1].chain
    assert [e.name for e in chain.elements] == ["conv", "bn", "relu"]


def test_repeat_group_and_loop():
    layers = parse(SRC).layers
    call = layers[1].chain.elements[0]
    assert isinstance(call, ast.Call) and call.repeat.value == 2
    group = layers[2].chain.elements[0]
    assert isinstance(group, ast.Group) and group.repeat.value == 2
    conv = group.chain.elements[0]
    assert isinstance(conv.args[1].value, ast.Dims) and conv.args[1].value.values == (1, 7)
    assert isinstance(conv.args[2].value, ast.TupleExpr)
    loop = layers[3]
    assert isinstance(loop, ast.For) and loop.var == "i" and loop.start.value == 1 and loop.stop.value == 3


def test_spans_point_at_the_source():
    p = parse(SRC, "tiny.cnn")
    conv = p.layers[0].chain.elements[0]
    assert (conv.span.line, conv.span.col) == (14, 5)
    assert (conv.name_span.end_col - conv.name_span.col) == 4
    assert str(conv.span) == "tiny.cnn:14:5"


def test_arithmetic_precedence():
    p = parse("network t\ninput 3x8x8\nlayers:\n    conv 2+3*4 1x1\n")
    e = p.layers[0].chain.elements[0].args[0].value
    assert isinstance(e, ast.BinOp) and e.op == "+" and isinstance(e.right, ast.BinOp) and e.right.op == "*"


@pytest.mark.parametrize("text, line, col", [
    ("network t\ninput 3x8x8\nlayers:\n    conv 8 3x3 ->\n", 4, 18),
    ("network t\ninput 3x8x8\nlayers\n    relu\n", 3, 7),
    ("network t\ninput 3x8x8\nlayers:\n    conv 8 $\n", 4, 12),
])
def test_syntax_errors_are_located(text, line, col):
    with pytest.raises(CnncError) as e:
        parse(text, "x.cnn")
    assert e.value.message.startswith("syntax error")
    assert (e.value.span.line, e.value.span.col) == (line, col)


def test_declared_twice():
    with pytest.raises(CnncError, match="`network` is declared twice"):
        parse("network a\nnetwork b\ninput 3x8x8\nlayers:\n    relu\n")


def test_block_defined_twice():
    with pytest.raises(CnncError, match="block `b` is defined twice"):
        parse("network a\ninput 3x8x8\nblock b():\n    relu\nblock b():\n    relu\nlayers:\n    b()\n")


def test_error_render_has_caret_under_the_span():
    with pytest.raises(CnncError) as e:
        parse("network t\ninput 3x8x8\nlayers:\n    conv 8 $\n", "x.cnn")
    text = e.value.render()
    assert text.splitlines()[0].startswith("x.cnn:4:12: error: syntax error: unexpected character `$`")
    assert text.splitlines()[1] == "    4 |     conv 8 $"
    assert text.splitlines()[2] == "      |            ^"
