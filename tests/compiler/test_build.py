"""The graph builder on hostile programs: deep block chains, mistakes inside long loops, huge
legal expansions, more errors than are worth reporting, train settings out of range."""

from __future__ import annotations

import json

import pytest

from cnnc.dsl import limits

from conftest import run_cli

HEADER = "network t\ninput 3x32x32\nclasses 10\n"


def test_a_deep_chain_of_block_calls_is_a_located_error(cnn):
    blocks = "".join(f"block b{i}():\n    b{i + 1}()\n" for i in range(200)) + "block b200():\n    relu\n"
    path = cnn(HEADER + blocks + "layers:\n    b0()\n")
    r = run_cli("check", str(path))
    assert r.code == 1 and "Traceback" not in r.err
    assert f"nest more than {limits.MAX_CALL_DEPTH} levels deep" in r.err
    assert "more block calls" in r.err  # the call stack is shown by its ends, not 64 notes
    assert r.err.count("called here") <= 12


def test_block_calls_at_the_depth_limit_work(cnn):
    n = limits.MAX_CALL_DEPTH - 1
    blocks = "".join(f"block b{i}():\n    b{i + 1}()\n" for i in range(n)) + f"block b{n}():\n    relu\n"
    path = cnn(HEADER + blocks + "layers:\n    conv 8 3x3 -> b0() -> gap -> dense 10\n")
    r = run_cli("check", str(path))
    assert r.code == 0, r.err


def test_one_mistake_in_a_long_loop_is_reported_once(cnn):
    path = cnn(HEADER + "layers:\n    for i in range(20000):\n        conv 8 3x3 foo=1\n")
    r = run_cli("check", str(path))
    assert r.code == 1
    assert r.err.count("error: unknown attribute `foo`") == 1
    assert "1 error generated." in r.err


def test_a_mistake_that_appears_late_in_a_loop_is_reported(cnn):
    # the first iterations are fine; the error shows at i = 3 and the loop stops there
    path = cnn(HEADER + "layers:\n    for i in range(20000):\n        conv 8 3x3 pad=3-i\n")
    r = run_cli("check", str(path))
    assert r.code == 1 and "cannot be negative" in r.err
    assert r.err.count("error:") == 1


def test_errors_stop_at_the_cap(cnn):
    body = "".join(f"    conv 8 3x3 foo{i}=1\n" for i in range(200))
    path = cnn(HEADER + "layers:\n" + body)
    r = run_cli("check", str(path))
    assert r.code == 1
    assert r.err.count("unknown attribute") == limits.MAX_ERRORS
    assert "too many errors" in r.err


def test_a_large_legal_repeat_checks(cnn):
    path = cnn(HEADER + f"layers:\n    conv 8 3x3 -> (relu) * {limits.MAX_LAYERS - 4} -> gap -> dense 10\n")
    r = run_cli("check", str(path), "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["params"]["total"] == 8 * 3 * 9 + 8 + 8 * 10 + 10
    assert len(summary["layers"]) == limits.MAX_LAYERS


def test_a_network_past_the_layer_limit_is_refused_at_once(cnn):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 -> (relu) * 50000 -> gap -> dense 10\n")
    r = run_cli("check", str(path))
    assert r.code == 1 and "repeat count must be between 0 and 20000" in r.err
    path = cnn(HEADER + "layers:\n    conv 8 3x3 -> (relu) * 15000 -> (relu) * 15000\n")
    r = run_cli("check", str(path))
    assert r.code == 1 and "expands to more than 20000 layers" in r.err


@pytest.mark.parametrize("setting, fragment", [
    ("seed -5", "greater than or equal to 0"),
    ("seed 99999999999999999999", "too large"),
    ("lr 1e300*1e300", "too large for a float"),
    ("batch 0", "greater than 0"),
])
def test_train_settings_out_of_range_are_located(cnn, setting, fragment):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 -> gap -> dense 10\ntrain:\n    " + setting + "\n")
    r = run_cli("check", str(path))
    assert r.code == 1, r.err
    assert r.first_error()[1] == 7
    assert fragment in r.err, r.err


def test_flag_overrides_out_of_range(cnn, tmp_path):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 -> gap -> dense 10\n")
    for flag, value, fragment in (("--seed", "-1", "--seed"), ("--lr", "inf", "--lr"), ("--lr", "nan", "--lr")):
        r = run_cli("train", str(path), flag, value, "-o", str(tmp_path / "run"))
        assert r.code == 1 and fragment in r.err and "Traceback" not in r.err, r.err
        assert not (tmp_path / "run").exists()


def test_independent_unknown_names_are_all_reported_at_once(cnn):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 -> hardswsh -> bn -> gelux -> mishh\n    conv 4 3x3 -> reluu\n")
    r = run_cli("check", str(path))
    assert r.code == 1
    found = [(line, col, msg.split("`")[1]) for line, col, msg in r.errors()]
    assert found == [(5, 19, "hardswsh"), (5, 37, "gelux"), (5, 46, "mishh"), (6, 19, "reluu")]
    assert "did you mean `hardswish`" in r.err and "4 errors generated" in r.err


def test_keras_spellings_are_aliases_and_a_suggestion_names_each_op_once(cnn):
    ok = cnn(HEADER + "layers:\n    conv 8 3x3 -> hard_swish -> hard_sigmoid -> gap -> dense 2\n", "ok.cnn")
    assert run_cli("check", str(ok)).code == 0
    r = run_cli("check", str(cnn(HEADER + "layers:\n    conv 8 3x3 -> hardsigmod\n")))
    # hardsigmoid and its alias hard_sigmoid are one op: offered once, then the next closest ops
    assert "hint: did you mean `hardsigmoid` or `sigmoid` or `hardswish`?" in r.err, r.err
