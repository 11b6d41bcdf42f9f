"""The tuning cache both backends share (backends/tuning.py): modes, reuse, damage, concurrent writers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from cnnc.backends import tuning


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("CNNC_TUNING_CACHE", str(path))
    return path


def timer(seconds: dict, calls: list):
    def time_candidate(c):
        calls.append(c)
        if seconds[c] is None:
            raise RuntimeError("does not fit")
        return seconds[c]
    return time_candidate


def test_full_times_every_candidate_and_stores_the_fastest(cache):
    calls = []
    best = tuning.choose("m|p", ["a", "b", "c", "d"], timer({"a": 3, "b": 2, "c": 4, "d": 1}, calls), "full")
    assert best == "d" and calls == ["a", "b", "c", "d"]
    entry = json.loads(cache.read_text())["m|p"]
    assert entry["config"] == "'d'" and entry["seconds"] == 1 and entry["timed"] == {"'a'": 3, "'b'": 2,
                                                                                       "'c'": 4, "'d'": 1}


def test_fast_times_the_first_three_and_off_none(cache):
    calls = []
    assert tuning.choose("m|p", ["a", "b", "c", "d"], timer({"a": 3, "b": 2, "c": 4, "d": 1}, calls), "fast") == "b"
    assert calls == ["a", "b", "c"]
    calls.clear()
    assert tuning.choose("m|q", ["a", "b"], timer({"a": 3, "b": 2}, calls), "off") == "a"
    assert calls == [] and "m|q" not in json.loads(cache.read_text())


def test_a_stored_choice_is_reused_untimed_unless_it_is_no_longer_a_candidate(cache):
    calls = []
    seconds = {"a": 3, "b": 2, "c": 1}
    tuning.choose("m|p", ["a", "b"], timer(seconds, calls), "full")
    calls.clear()
    assert tuning.choose("m|p", ["a", "b"], timer(seconds, calls), "full") == "b" and calls == []
    assert tuning.choose("m|p", ["a", "c"], timer(seconds, calls), "full") == "c" and calls == ["a", "c"]


def test_a_candidate_that_raises_is_skipped(cache):
    assert tuning.choose("m|p", ["a", "b"], timer({"a": None, "b": 5}, []), "full") == "b"
    assert tuning.choose("m|q", ["a", "b"], timer({"a": None, "b": None}, []), "full") == "a"  # the heuristic's


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_damaged_cache_is_tuned_again(cache, text):
    cache.write_bytes(text.encode("latin-1"))
    assert tuning.choose("m|p", ["a", "b"], timer({"a": 3, "b": 2}, []), "full") == "b"
    assert json.loads(cache.read_text())["m|p"]["config"] == "'b'"


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="autotune mode 'fastest'"):
        tuning.choose("m|p", ["a", "b"], lambda c: 1.0, "fastest")


def test_tuning_cache_survives_concurrent_writers(cache):
    """Parallel test workers once crashed renaming each other's temporary file."""
    def write(i):
        for j in range(50):
            tuning.store({f"problem{i}": {"config": f"cfg{j}", "seconds": 1e-3, "mode": "fast"}})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))
    assert len(tuning.load()) == 1 and not list(cache.parent.glob("*.tmp"))


def test_the_first_candidate_stays_unless_another_beats_the_margin(cache):
    seconds = {"a": 1.04, "b": 1.0, "c": 1.2}
    assert tuning.choose("m|p", ["a", "b", "c"], timer(seconds, []), "full", margin=0.05) == "a"
    assert tuning.choose("m|q", ["a", "b", "c"], timer({**seconds, "a": 1.06}, []), "full", margin=0.05) == "b"
    assert tuning.choose("m|r", ["a", "b", "c"], timer(seconds, []), "full") == "b"
