"""Functions in `.cnn` expressions: values, torchvision's make_divisible, and located errors."""

from __future__ import annotations

import pytest

from cnnc.compiler.functions import make_divisible
from cnnc.compiler.pipeline import run_pipeline
from cnnc.dsl import load_text
from cnnc.dsl.errors import CnncErrors


def filters(expr: str, call: bool = False) -> int:
    layer = f"conv({expr}, 1x1)" if call else f"conv {expr} 1x1"
    g = run_pipeline(load_text(f"network t\ninput 3x8x8\nlayers:\n    {layer}\n", "t.cnn"))
    return next(d["attrs"].filters for _, d in g.nodes(data=True) if d["op"] == "conv")


@pytest.mark.parametrize("expr,value", [
    ("max(4, 2 * 3)", 6), ("min(8, 5, 7)", 5), ("abs(-3)", 3), ("round(2.5)", 2), ("round(3.5)", 4),
    ("floor(7 / 2)", 3), ("ceil(7 / 2)", 4), ("make_divisible(32 * 0.75)", 24), ("make_divisible(3)", 8),
    ("make_divisible(10, 4)", 12), ("make_divisible(37, 8, 16)", 40), ("max(min(8, 3), 2) * 2", 6),
])
def test_values(expr, value):
    assert filters(expr) == value
    assert filters(f"({expr})", call=True) == value  # also in parentheses, in the call form's arguments


def test_make_divisible_is_torchvisions_rule():
    def torchvision(v, divisor, min_value=None):  # torchvision.models._utils._make_divisible
        if min_value is None:
            min_value = divisor
        new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
        if new_v < 0.9 * v:
            new_v += divisor
        return new_v

    for v in [3, 8, 11.5, 16 * 1.4, 24 * 0.35, 320 * 1.3, 1280 * 0.75, 67, 100.0]:
        for d in (1, 4, 8, 16):
            assert make_divisible(v, d) == torchvision(v, d), (v, d)


def test_inside_blocks_and_call_form():
    text = ("network t\ninput 3x8x8\nblock b(c, t):\n    conv(make_divisible(c * t), 1x1) -> relu()\n"
            "layers:\n    b(16, 0.75) -> b(max(8, 12), 1)\n")
    g = run_pipeline(load_text(text, "t.cnn"))
    assert [d["attrs"].filters for _, d in sorted(g.nodes(data=True)) if d["op"] == "conv"] == [16, 16]


@pytest.mark.parametrize("expr,message,col", [
    ("maxx(4, 2)", "unknown function `maxx`", 10),
    ("max(4)", "`max` takes 2 or more arguments, got 1", 10),
    ("round(1, 2)", "`round` takes 1 argument, got 2", 10),
    ("relu(3)", "unknown function `relu`", 10),
    ("make_divisible(10, 0)", "`make_divisible`: its divisor must be a positive integer", 10),
    ("max(4, 3x3)", "arithmetic needs numbers, got 3x3", 17),
    ("floor(1e15 * 1e15)", "too large", 10),
])
def test_errors_are_located(expr, message, col):
    with pytest.raises(CnncErrors) as info:
        filters(expr)
    err = info.value.errors[0]
    assert message in err.message, err.message
    assert (err.span.line, err.span.col) == (4, col)
