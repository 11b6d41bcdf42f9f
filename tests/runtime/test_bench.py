"""`cnnc bench`: the JSON fields, per-layer rows, and PyTorch as a peer in the same process."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, run_cli


def test_bench_json_with_torch_peer():
    pytest.importorskip("torch")
    r = run_cli("bench", str(EXAMPLES / "lenet5.cnn"), "--batch", "8", "--train", "--vs", "torch", "--repeats", "2",
                "--json")
    assert r.code == 0, r.err
    j = json.loads(r.out)
    for key in ("ms_per_step", "images_per_s", "peer", "peer_ms_per_step", "ratio"):
        assert key in j
    assert j["peer"] == "torch" and j["ratio"] == pytest.approx(j["ms_per_step"] / j["peer_ms_per_step"])
    assert j["images_per_s"] == pytest.approx(1000 * 8 / j["ms_per_step"])


def test_bench_layers_are_sorted_and_shares_sum_to_one():
    r = run_cli("bench", str(EXAMPLES / "lenet5.cnn"), "--batch", "4", "--layers", "--repeats", "2", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["layers"]
    totals = [x["forward_ms"] + x["backward_ms"] for x in rows]
    assert totals == sorted(totals, reverse=True)
    assert sum(x["share"] for x in rows) == pytest.approx(1.0)
    assert json.loads(r.out)["peer"] is None


def test_bench_offers_only_peers_it_has():
    # onnxruntime is not offered until cnnc can export ONNX: argparse refuses it, exit 2
    with pytest.raises(SystemExit) as exc:
        run_cli("bench", str(EXAMPLES / "lenet5.cnn"), "--vs", "onnxruntime", "--repeats", "1")
    assert exc.value.code == 2
