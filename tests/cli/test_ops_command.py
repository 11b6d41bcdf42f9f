"""`cnnc ops`: the layer listing, generated from the op table."""

from __future__ import annotations

import json

from cnnc.compiler.ops import OPS

from conftest import run_cli


def test_the_listing_has_every_layer_and_every_formula():
    r = run_cli("ops")
    assert r.code == 0
    for name, op in OPS.items():
        if op.user:
            assert f"| `{name}` |" in r.out, name
        if op.user and op.formula is not None:
            assert op.formula.derivative in r.out, name


def test_one_layer_by_alias_as_json():
    r = run_cli("ops", "swish", "--json")
    assert r.code == 0
    (silu,) = json.loads(r.out)
    assert silu["layer"] == "silu" and silu["formula"] == "x * sigmoid(x)" and silu["backward_keeps"] == ["input"]
    assert silu["pytorch"] == "F.silu(x)"


def test_an_unknown_layer_gets_a_suggestion():
    r = run_cli("ops", "hardswsh")
    assert r.code == 1 and "no layer named `hardswsh`" in r.err and "did you mean `hardswish`" in r.err
