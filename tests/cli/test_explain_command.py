"""`cnnc check FILE --explain [LAYER]`: the arithmetic of output sizes, parameters and receptive
fields on the command line, as text and in --json."""

from __future__ import annotations

import json

from conftest import EXAMPLES, run_cli

ALEXNET = str(EXAMPLES / "alexnet_2012.cnn")


def test_explain_conv1_of_alexnet():
    # AlexNet (Krizhevsky et al. 2012; Caffe's bvlc_alexnet): 96 filters 11×11×3 at stride 4 on
    # 227×227 give 55×55, 96·3·11·11 + 96 parameters; the seed's example of (W − F + 2P)/S + 1
    r = run_cli("check", ALEXNET, "--explain", "conv1")
    assert r.code == 0, r.err
    assert "conv1: conv 11x11/4 96, 3×227×227 → 96×55×55" in r.out
    assert "(W − F + 2P)/S + 1 = (227 − 11 + 2·0)/4 + 1 = 55, a whole number (round=exact)" in r.out
    assert "K·(C/g)·kh·kw (+K) = 96·(3/1)·11·11 + 96 = 34,944" in r.out
    assert "r = 1 + (11 − 1)·1 = 11, j = 1·4 = 4" in r.out
    assert "conv2" not in r.out and "layer  " not in r.out  # one layer, no table
    docs = (EXAMPLES.parent / "docs" / "language.md").read_text()
    shown = docs.split("$ cnnc check examples/alexnet_2012.cnn --explain conv1\n", 1)[1].split("```", 1)[0]
    assert shown == r.out, "docs/language.md's --explain example is not what cnnc prints"


def test_explain_every_layer_as_json_carries_the_text():
    text = run_cli("check", ALEXNET, "--explain")
    r = run_cli("check", ALEXNET, "--explain", "--json")
    assert r.code == 0 and text.code == 0
    data = json.loads(r.out)
    entries = data["explain"]
    assert [e["name"] for e in entries] == ["conv1", "maxpool1", "conv2", "maxpool2", "conv3", "conv4", "conv5",
                                            "maxpool3", "dense1", "dense2", "dense3"]
    assert sum(e["params"]["total"] for e in entries if "params" in e) == data["params"]["total"]
    for e in entries:
        assert e["text"] in text.out
    conv2 = entries[2]
    assert conv2["size"][0] | {"text": None, "arithmetic": None} == {
        "axis": "height", "n": 27, "kernel": 5, "dilation": 1, "extent": 5, "stride": 1, "pad": [2, 2],
        "rounding": "exact", "rule": "round=exact", "value": 27.0, "out": 27, "text": None, "arithmetic": None}


def test_an_unknown_layer_is_an_error_naming_the_close_ones():
    r = run_cli("check", ALEXNET, "--explain", "conv9")
    assert r.code == 1 and r.out == ""
    assert "alexnet_2012.cnn: --explain: no layer or block instance named `conv9`" in r.err
    assert "did you mean `conv5` or `conv4` or `conv3`?" in r.err and "Traceback" not in r.err


def test_explain_before_the_file_reads_the_file():
    # `--explain` takes an optional LAYER; a .cnn path there is the file, as a user writing the flag first means
    first = run_cli("check", "--explain", ALEXNET)
    assert first.code == 0 and first.out == run_cli("check", ALEXNET, "--explain").out
    missing = run_cli("check")
    assert missing.code == 2 and "cnnc check needs a FILE" in missing.err and "Traceback" not in missing.err
