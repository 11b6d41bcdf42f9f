"""Memory is estimated before it is allocated: networks that cannot fit are refused with the figures,
the machine's available memory and a hint, in every command that would allocate; --max-memory
sets the limit instead."""

from __future__ import annotations

import resource

import pytest

from cnnc.dsl.errors import CnncError
from cnnc.runtime import budget

from conftest import EXAMPLES, run_cli

HUGE_DENSE = "network huge\ninput 1000000\nclasses 10\nlayers:\n    dense 1000000 -> dense 10\n"
WIDE_CONVS = "network wide\ninput 3x32x32\nclasses 10\nlayers:\n    (conv 4096 3x3 pad=1) * 64 -> gap -> dense 10\n"


def refused(r, *fragments):
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "MemoryError" not in r.err
    assert "needs an estimated" in r.err and "--max-memory" in r.err
    for f in fragments:
        assert f in r.err, r.err
    return r


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("command", [
    ("compile", "-o", "{tmp}/out"),
    ("train", "-o", "{tmp}/run", "--data", "mnist5k"),
    ("bench", "--repeats", "1"),
    ("bench", "--train", "--repeats", "1"),
    ("viz", "-O2", "-o", "{tmp}/g.dot"),
])
def test_a_dense_layer_of_a_trillion_weights_is_refused_everywhere(cnn, tmp_path, command):
    path = cnn(HUGE_DENSE)
    before = rss_mb()
    args = [a.format(tmp=tmp_path) for a in command]
    r = run_cli(args[0], str(path), *args[1:])
    r = refused(r, "TiB", "dense1")
    assert rss_mb() - before < 500  # nothing of the sort was allocated
    _, line, col, _ = r.first_error()
    assert (line, col) == (5, 5)  # the layer that needs the most
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_sixty_four_wide_convolutions_are_refused_with_the_figures(cnn):
    path = cnn(WIDE_CONVS)
    r = refused(run_cli("compile", str(path)), "GiB", "weights and buffers", "parameters")
    assert "available on this machine" in r.err


def test_check_still_counts_what_it_cannot_run(cnn):
    r = run_cli("check", str(cnn(HUGE_DENSE)))
    assert r.code == 0 and "1,000,011,000,010 total" in r.out


def test_training_counts_gradients_optimizer_state_and_activations(cnn, tmp_path):
    path = cnn("network t\ninput 3x32x32\nclasses 10\nlayers:\n    conv 64 3x3 pad=1 -> relu -> gap -> dense 10\n"
               "train:\n    optimizer adam\n    batch 4096\n")
    r = refused(run_cli("train", str(path), "--data", "mnist5k", "--max-memory", "100M", "-o", str(tmp_path / "r")),
                "gradients", "adam state", "activations at batch 4096", "limit set by --max-memory")
    assert not (tmp_path / "r").exists()


def test_max_memory_lets_a_user_set_the_limit(cnn, tmp_path):
    lenet = str(EXAMPLES / "lenet5.cnn")
    refused(run_cli("compile", lenet, "--max-memory", "10K"), "limit set by --max-memory (10.0 KiB)")
    assert run_cli("compile", lenet, "--max-memory", "none").code == 0
    r = run_cli("compile", lenet, "--max-memory", "lots")
    assert r.code == 1 and "--max-memory takes a size" in r.err


def test_environment_variable_sets_the_limit(monkeypatch):
    monkeypatch.setenv(budget.ENV, "1K")
    r = run_cli("compile", str(EXAMPLES / "lenet5.cnn"))
    refused(r, budget.ENV)


@pytest.mark.parametrize("text, size", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("2048", 2048),
                                        ("64kb", 64 << 10), ("none", None)])
def test_parse_size(text, size):
    assert budget.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1G", "0", "1X", "G"])
def test_parse_size_refuses(text):
    with pytest.raises(CnncError, match="takes a size"):
        budget.parse_size(text)


def test_available_memory_is_read_from_the_system():
    avail = budget.available_bytes()
    assert avail is not None and 0 < avail < 1 << 50


def test_api_load_is_guarded_too(cnn):
    import cnnc
    with pytest.raises(CnncError, match="needs an estimated"):
        cnnc.load(cnn(HUGE_DENSE))


def test_run_refuses_an_input_batch_that_cannot_fit(tmp_path):
    import numpy as np
    out = tmp_path / "art"
    assert run_cli("compile", str(EXAMPLES / "lenet5.cnn"), "-o", str(out)).code == 0
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(20000, 1, 32, 32))
    del x
    r = run_cli("run", str(out), "--input", str(tmp_path / "x.npy"), "--max-memory", "20M")
    refused(r, "input")
