"""compiler/explain.py: every number `cnnc check --explain` writes out is the checked graph's.

The oracle is the explanation's own arithmetic, evaluated here with exact fractions and rounded
as its text says, against what shape inference and counting found for every layer of every zoo
network; the suggested paddings are applied to the source and checked again."""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest

from cnnc.compiler.explain import explain
from cnnc.compiler.graph import inputs_of
from cnnc.compiler.ops import GLOBAL, OPS
from cnnc.compiler.pipeline import check
from cnnc.dsl.errors import CnncError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ZOO = sorted(EXAMPLES.glob("*.cnn"))


def value(text: str) -> Fraction:
    """An arithmetic text of the explanation (− minus, · times) evaluated exactly."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}

    def walk(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return Fraction(n.value)
        assert isinstance(n, ast.BinOp) and type(n.op) in ops, ast.dump(n)
        return ops[type(n.op)](walk(n.left), walk(n.right))
    return walk(ast.parse(text.replace("−", "-").replace("·", "*"), mode="eval").body)


def shown_size(axis: dict) -> int:
    """The output size an axis's text arrives at, checked against its own arithmetic and rounding."""
    rest = axis["text"].split(axis["arithmetic"] + " = ", 1)[1].split(" (", 1)[0]
    exact = value(axis["arithmetic"])
    shown = int(re.findall(r"\d+", rest)[-1])
    if "⌊" in rest:
        assert shown == math.floor(exact)
    elif "⌈" in rest:
        up = math.ceil(exact)
        if rest.count("→") == 2:  # the last window would start in the end padding (Caffe, PyTorch's pooling)
            assert (up - 1) * axis["stride"] >= axis["n"] + axis["pad"][0] and shown == up - 1
        else:
            assert shown == up
    else:
        assert exact.denominator == 1 and shown == exact, axis["text"]
    return shown


def shown_field(text: str) -> tuple[int, int, int, int]:
    """(r_h, r_w, j_h, j_w) from `r = 1 + (11 − 1)·1 = 11, j = 1·4 = 4` (or its height; width form)."""
    axes = re.findall(r"r = ([^=]+) = (\d+), j = ([^=]+) = (\d+)", text)
    assert len(axes) in (1, 2), text
    for r_expr, r, j_expr, j in axes:
        assert value(r_expr) == int(r) and value(j_expr) == int(j), text
    return int(axes[0][1]), int(axes[-1][1]), int(axes[0][3]), int(axes[-1][3])


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_every_explained_number_is_the_checked_one(path):
    g = check(path)
    entries = {e["name"]: e for e in explain(g)}
    for n in sorted(g.nodes):
        d = g.nodes[n]
        op = OPS[d["op"]]
        ins = [g.nodes[u]["shape"] for u in inputs_of(g, n)]
        e = entries.pop(d["name"], None)
        if not ins or (op.window(d["attrs"], ins) is None and not d["param_specs"]):
            assert e is None, d["name"]
            continue
        assert e is not None and e["shape"] == list(d["shape"]), d["name"]
        if op.slides is not None:
            assert [shown_size(a) for a in e["size"]] == list(d["shape"][1:]), e["text"]
        if d["param_specs"]:
            assert value(e["params"]["numbers"]) == d["params"] == e["params"]["total"], e["params"]["text"]
        assert ("rf" in e) == (op.window(d["attrs"], ins) is not None), d["name"]
        if "rf" in e and d["rf"] != GLOBAL and e["rf"]["in"] != GLOBAL:
            assert shown_field(e["rf"]["text"]) == (d["rf"][0], d["rf"][1], d["rf"][2], d["rf"][3]), e["rf"]["text"]
    assert not entries


NET = """\
network t
input image: 3x64x60
classes 10

layers:
    conv 8 5x5 stride=2 round=floor -> bn -> relu
    conv 8 3x3 dilation=2 pad=2 -> maxpool 3x3 stride=2 round=ceil
    conv 8 4x4 pad=same stride=2 -> maxpool 3x3 stride=3 round=ceil pad=1
    conv 8 1x7 pad=(0, 0, 3, 3) -> pad_channels 16 stride=2 -> avgpool 2 round=floor
    gap -> dense classes
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "t.cnn"
    path.write_text(NET)
    return path, check(path)


def by_name(g, name):
    (e,) = explain(g, name)
    return e


def test_rounding_is_named_as_the_layer_spells_it(net):
    _, g = net
    h, w = by_name(g, "conv1")["size"]
    assert "(64 − 5 + 2·0)/2 + 1 = 30.5 → ⌊30.5⌋ = 30 (round=floor: the last 1 pixel fit no window)" in h["text"]
    assert w["text"].startswith("(W − F + 2P)/S + 1 = (60 − 5 + 2·0)/2 + 1 = 28.5")
    dilated = by_name(g, "conv2")["size"][0]["text"]
    assert dilated.startswith("F' = D(F − 1) + 1 = 2·(3 − 1) + 1 = 5; (H − F' + 2P)/S + 1 = (30 − 5 + 2·2)/1 + 1")
    same = by_name(g, "conv3")["size"][0]["text"]
    assert "(H − F + P0 + P1)/S + 1 = (15 − 4 + 1 + 2)/2 + 1 = 8" in same and "pad=same pads 1 + 2" in same
    dropped = by_name(g, "maxpool2")["size"][0]["text"]
    assert "⌈3.333⌉ = 4 → 3 (round=ceil" in dropped and "is dropped" in dropped


def test_the_suggested_paddings_check_to_the_sizes_shown(net, tmp_path):
    path, g = net
    for name, line in (("conv1", "    conv 8 5x5 stride=2 round=floor"), ("maxpool1", "maxpool 3x3 stride=2 round=ceil")):
        for p in by_name(g, name)["padding"]:
            assert p["ok"], p["text"]
            t, b, l, r = p["pads"]
            rewritten = NET.replace(line, re.sub(r" round=\w+", "", line) + f" pad=({t}, {b}, {l}, {r})")
            assert rewritten != NET
            again = tmp_path / f"{name}_{p['kind']}.cnn"
            again.write_text(rewritten)
            node = next(d for _, d in check(again).nodes(data=True) if d["name"] == name)
            assert list(node["shape"]) == p["shape"], p["text"]
    keep = by_name(g, "conv2")["padding"][1]["text"]
    assert keep.startswith("keeps the size with P = (F' − 1)/2 = (5 − 1)/2 = 2: pad=2") and "as written" in keep


def test_a_padding_the_layer_refuses_is_said_so(tmp_path):
    # maxpool 1x1/2 on 8: (8 − 1 + P0 + P1)/2 is whole with P0 + P1 = 1, but a pool's pad may not
    # exceed half its kernel (0 here): the shape rule refuses, and the explanation says why
    path = tmp_path / "pool.cnn"
    path.write_text("network p\ninput image: 1x8x8\n\nlayers:\n    maxpool 1 stride=2 round=floor\n")
    (e,) = explain(check(path))
    exact, keep = e["padding"]
    assert exact["pads"] == [0, 1, 0, 1] and not exact["ok"]
    assert "which maxpool refuses (maxpool pad 1 is more than half the kernel 1 (height))" in exact["text"]
    assert keep["ok"] and keep["shape"] == [1, 4, 4] and "as written" in keep["text"]


def test_parameters_and_buffers_follow_the_table(net):
    _, g = net
    bn = by_name(g, "bn1")
    assert bn["params"]["text"] == "2C (0 if `affine=false`) = 8 + 8 = 16"
    assert "running_mean, running_var; not trained" in explain(g, "bn1")[0]["text"]
    assert by_name(g, "dense1")["params"]["text"] == "U·F (+U) = 10·16 + 10 = 170"
    assert by_name(g, "dense1")["rf"]["text"].startswith("global")


def test_a_block_instance_selects_its_layers_and_an_unknown_name_lists_close_ones():
    g = check(EXAMPLES / "resnet18.cnn")
    names = [e["name"] for e in explain(g, "basic1")]
    assert names == ["basic1.conv1", "basic1.bn1", "basic1.conv2", "basic1.bn2"]
    with pytest.raises(CnncError, match=r"no layer or block instance named `basic1.conv9`") as err:
        explain(g, "basic1.conv9")
    assert "basic1.conv1" in err.value.hint
    (relu,) = explain(g, "relu1")
    assert "no sliding window and no parameters" in relu["text"]
