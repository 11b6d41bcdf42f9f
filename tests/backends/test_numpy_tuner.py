"""Convolution algorithm choice by measurement (backends/numpy/tuner.py, conv.algorithms): what is
timed, what is kept, and that a slow algorithm loses. The algorithms' results are compared with
im2col's in test_numpy_grad.py."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cnnc.backends.base import Ctx
from cnnc.backends.numpy import blas, conv, direct, parallel, tuner

from conftest import run_cli
from test_numpy_grad import make_node, make_params


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("CNNC_TUNING_CACHE", str(path))
    monkeypatch.setenv("CNNC_AUTOTUNE", "full")
    monkeypatch.setattr(tuner, "_chosen", {})
    monkeypatch.setattr(tuner, "MIN_MACS", 0)
    monkeypatch.setattr(conv, "DIRECT_MAX_CHANNELS", 0)  # the gemm-based heuristic these tests are written for
    return path


def problem(c=16, k=16, size=12, batch=4):
    rng = np.random.default_rng(0)
    node, specs = make_node("conv", dict(filters=k, kernel=3, pad=1), [(c, size, size)])
    params = make_params(specs, rng, np.float32)
    x = rng.normal(size=(batch, c, size, size)).astype(np.float32)
    return node, params, x


def entries(path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k.startswith("cpu:")}


def counting(monkeypatch) -> list:
    calls = []
    forward = conv._forward

    def counted(node, algo, *args):
        calls.append(algo)
        return forward(node, algo, *args)
    monkeypatch.setattr(conv, "_forward", counted)
    return calls


def test_every_candidate_is_timed_and_the_fastest_is_kept(cache):
    node, params, x = problem()
    names = conv.algorithms(node, 16, training=True)
    compiled = ["direct"] if direct.available() else []  # the C kernel, where a compiler is there
    assert names == ["im2col", *compiled, "shifted_taps", "shifted_stacked", "winograd"]  # 12×12: im2col's heuristic
    y, saved = conv.conv_forward(node, [x], params, Ctx(training=True))
    (key, entry), = entries(cache).items()
    assert f"|{parallel.get_threads()}t|" in key and "|4x16x12x12|float32|k16|3x3|" in key and key.endswith("|train+dx")
    timed = {eval(c): s for c, s in entry["timed"].items()}  # noqa: S307 - the cache's repr of a name
    assert set(timed) == set(names)
    fastest = min(timed, key=timed.get)
    kept = names[0] if timed[names[0]] <= timed[fastest] * (1 + tuner.MARGIN) else fastest
    assert eval(entry["config"]) == kept  # noqa: S307
    assert isinstance(saved[0], str) == (eval(entry["config"]) != "im2col")  # noqa: S307


def test_a_slow_algorithm_is_not_chosen(cache, monkeypatch):
    """The heuristic's own choice made 20 ms slower loses to the others, forward and backward timed."""
    node, params, x = problem()
    im2col = conv._conv

    def slow(*args, **kw):
        time.sleep(0.02)
        return im2col(*args, **kw)
    monkeypatch.setattr(conv, "_conv", slow)
    conv.conv_forward(node, [x], params, Ctx(training=True))
    (entry,) = entries(cache).values()
    assert entry["config"] != "'im2col'" and entry["timed"]["'im2col'"] > 0.02


def test_the_choice_is_read_back_untimed(cache, monkeypatch):
    node, params, x = problem()
    conv.conv_forward(node, [x], params, Ctx(training=True))
    chosen = eval(next(iter(entries(cache).values()))["config"])  # noqa: S307
    monkeypatch.setattr(tuner, "_chosen", {})  # a new process
    calls = counting(monkeypatch)
    conv.conv_forward(node, [x], params, Ctx(training=True))
    assert calls == [chosen]


def test_inference_times_the_forward_only_under_its_own_key(cache, monkeypatch):
    node, params, x = problem()
    backward = []
    monkeypatch.setattr(conv, "_backward", lambda *a: backward.append(a))
    conv.conv_forward(node, [x], params, Ctx(training=False))
    (key,) = entries(cache)
    assert key.endswith("|infer") and backward == []


def test_off_and_small_problems_take_the_heuristics_choice_untimed(cache, monkeypatch):
    node, params, x = problem(size=34)  # the shifted windows' heuristic
    calls = counting(monkeypatch)
    monkeypatch.setenv("CNNC_AUTOTUNE", "off")
    conv.conv_forward(node, [x], params, Ctx(training=True))
    monkeypatch.setenv("CNNC_AUTOTUNE", "full")
    monkeypatch.setattr(tuner, "MIN_MACS", 4 * 16 * 34 * 34 * 16 * 9 + 1)
    conv.conv_forward(node, [x], params, Ctx(training=True))
    assert calls == ["shifted_stacked", "shifted_stacked"] and not cache.exists()


def test_the_key_names_the_thread_count(cache):
    node, params, x = problem()
    before = parallel.get_threads()
    try:
        for threads in (1, 2):
            parallel.set_threads(threads)
            conv.conv_forward(node, [x], params, Ctx(training=True))
        if blas.get_threads() == 1:  # a batch of one: our kernels unsplit, BLAS on the two threads
            with parallel.blas_threads_for(1):
                conv.conv_forward(node, [x], params, Ctx(training=True))
    finally:
        parallel.set_threads(before)
    want = ["1t", "1t+blas2t", "2t"] if blas.get_threads() == 1 else ["1t", "2t"]
    assert sorted(k.split("|")[3] for k in entries(cache)) == want


def test_one_algorithm_is_never_timed(cache, monkeypatch):
    node, specs = make_node("conv", dict(filters=8, kernel=3, stride=2, pad=2, dilation=2, round="floor"),
                            [(16, 12, 12)])
    assert conv.algorithms(node, 16, training=True) == ["im2col"]  # strided and dilated: im2col alone
    calls = counting(monkeypatch)
    conv.conv_forward(node, [np.ones((4, 16, 12, 12), np.float32)], make_params(specs, np.random.default_rng(0),
                                                                                 np.float32), Ctx(training=True))
    assert calls == ["im2col"] and not cache.exists()


def test_cnnc_autotune_full_tunes_a_training_step(tmp_path, monkeypatch):
    """The command line's --autotune reaches the NumPy backend; the step's 3×3 convs are tuned."""
    monkeypatch.setenv("CNNC_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setenv("CNNC_AUTOTUNE", "off")  # restored after the test: --autotune sets the variable
    monkeypatch.setattr(tuner, "_chosen", {})
    net = tmp_path / "net.cnn"
    net.write_text("network n\ninput 32x32x32\nclasses 4\n\nlayers:\n    conv 32 3x3 pad=same -> relu\n"
                   "    conv 32 3x3 pad=same -> relu\n    globalavgpool\n    dense classes\n", encoding="utf-8")
    r = run_cli("--autotune", "full", "bench", str(net), "--train", "--batch", "4", "--repeats", "1")
    assert r.code == 0, r.err
    keys = list(entries(tmp_path / "tuning.json"))
    assert len(keys) == 1 and "|4x32x32x32|float32|k32|3x3|" in keys[0]


def test_a_candidate_needing_far_more_memory_than_the_heuristic_is_not_timed(cache, monkeypatch):
    """im2col's columns are kh·kw times the input; with the shifted windows chosen by the heuristic
    and a small cap, neither im2col nor Winograd's tiles are tried (the shifted windows' and the
    direct conv's padded input are)."""
    node, params, x = problem(size=34)  # the heuristic: shifted windows, stacked taps
    assert conv._workspace_bytes(node, "im2col", x) > 8 * conv._workspace_bytes(node, "shifted_stacked", x)
    monkeypatch.setattr(tuner, "MAX_WORKSPACE_BYTES", 0)
    calls = counting(monkeypatch)
    conv.conv_forward(node, [x], params, Ctx(training=True))
    compiled = {"direct"} if direct.available() else set()
    assert set(calls) == {"shifted_stacked", "shifted_taps"} | compiled
    (entry,) = entries(cache).values()
    assert set(entry["timed"]) == {repr(name) for name in {"shifted_stacked", "shifted_taps"} | compiled}


def test_long_problems_get_fewer_rounds_and_say_why_once(monkeypatch, capsys):
    runs = []

    def run(c):
        runs.append(c)
        time.sleep(0.03)
    monkeypatch.setattr(tuner, "ROUNDS_SECONDS", 0.1)
    monkeypatch.setattr(tuner, "NOTICE_SECONDS", 0.05)
    monkeypatch.setattr(tuner, "_noticed", False)
    times = tuner.time_round_robin(["a", "b"], run)
    assert set(times) == {"a", "b"} and 2 + 2 <= len(runs) < 2 + 2 * tuner.REPEATS  # warm-up, then 1-2 rounds
    tuner.time_round_robin(["a", "b"], run)
    err = capsys.readouterr().err
    assert err.count("timing convolution algorithms on their first use") == 1 and "--autotune off" in err
