"""Hostile sources: each input that once gave a traceback, a hang, a blow-up or code execution now
gives a located error (or works), within the limits of dsl/limits.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from cnnc.dsl import limits, parse
from cnnc.dsl.errors import CnncError, CnncErrors

from conftest import EXAMPLES, REPO, run_cli

HEADER = "network t\ninput 3x32x32\nclasses 10\n"


def check_located(path, line: int, *fragments: str):
    """`cnnc check` fails with a located error at `line`, exit 1, no traceback."""
    r = run_cli("check", str(path))
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    _, got_line, _, message = r.first_error()
    assert got_line == line, r.err
    for frag in fragments:
        assert frag in r.err, f"{frag!r} not in:\n{r.err[:2000]}"
    return r


# ---- the parser's pickle cache ------------------------------------------------------------------

PLANT = textwrap.dedent("""
    import glob, os, pickle, sys
    from lark import Lark
    from cnnc.dsl.parser import GRAMMAR, _CnnIndenter
    def build():  # the parser as cnnc built it with Lark's pickle cache
        return Lark(GRAMMAR.read_text(encoding="utf-8"), parser="lalr", postlex=_CnnIndenter(),
                    propagate_positions=True, maybe_placeholders=True, cache=True)
    if sys.argv[1] == "plant":
        build()
        (name,) = glob.glob(os.path.join(os.environ["TMPDIR"], ".lark_cache_*.tmp"))
        class Payload:
            def __reduce__(self):
                return (open, (sys.argv[2], "w"))
        with open(name, "wb") as f:
            f.write(b"planted\\n" + pickle.dumps(Payload()))
    else:
        build()
""")


def test_a_planted_parser_cache_is_never_unpickled(tmp_path):
    """The exploit of the hardening issue: a pickle planted under Lark's predictable cache name in
    the shared temp dir ran on the next `cnnc check`. The positive control shows the plant works
    against a parser that uses the cache; cnnc's parser never opens it."""
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    marker = tmp_path / "pwned"
    env = {**os.environ, "TMPDIR": str(shared_tmp)}
    script = tmp_path / "plant.py"
    script.write_text(PLANT)
    subprocess.run([sys.executable, str(script), "plant", str(marker)], env=env, check=True, cwd=REPO)
    subprocess.run([sys.executable, str(script), "load"], env=env, cwd=REPO, capture_output=True)
    assert marker.exists(), "the planted cache should run in a parser built with cache=True"
    marker.unlink()
    r = subprocess.run([sys.executable, "-m", "cnnc", "check", str(EXAMPLES / "lenet5.cnn")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "cnnc check unpickled the planted cache"
    from cnnc.dsl.parser import _lark
    assert _lark().options.cache is False


# ---- what the reader accepts --------------------------------------------------------------------

def test_invalid_utf8_is_located(tmp_path):
    path = tmp_path / "bad.cnn"
    path.write_bytes(HEADER.encode() + b"layers:\n    conv 8 3x3 name=\"caf\xe9\"\n")
    r = check_located(path, 5, "not UTF-8", "0xe9")
    assert r.first_error()[2] == 25  # the column of the bad byte


def test_a_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "net.cnn"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(run_cli("check", str(fifo))), daemon=True)
    t.start()
    t.join(20)
    assert done, "cnnc check blocked on a FIFO"
    assert done[0].code == 1 and "is a FIFO" in done[0].err


def test_a_fifo_import_is_refused_at_the_import_line(cnn, tmp_path):
    os.mkfifo(tmp_path / "blocks.cnn")
    path = cnn(HEADER + 'import "blocks.cnn"\nlayers:\n    relu\n')
    check_located(path, 4, "is a FIFO")


def test_dev_zero_is_refused():
    r = run_cli("check", "/dev/zero")
    assert r.code == 1 and "is a device" in r.err


def test_a_source_over_the_size_limit_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.cnn"
    path.write_text(HEADER + "layers:\n    relu\n" + "#" * limits.MAX_SOURCE_BYTES)
    r = run_cli("check", str(path))
    assert r.code == 1 and f"larger than {limits.MAX_SOURCE_BYTES // 1024} KiB" in r.err
    path.write_text(HEADER + "\n" * 1_000_000 + "layers:\n    relu\n")  # the megabyte of blank lines
    r = run_cli("check", str(path))
    assert r.code == 1 and "larger than" in r.err


def test_blank_lines_up_to_the_size_limit_parse_in_little_memory():
    """1 MB of blank lines took 0.93 GB in parse(): the newline token's regex kept a backtracking
    frame per line (about 230 MiB for this quarter megabyte). tracemalloc sees the regex engine's
    allocations."""
    import tracemalloc
    text = HEADER + "\n" * (limits.MAX_SOURCE_BYTES - 200) + "layers:\n    relu ->\n" + "\n" * 100 + "    relu\n"
    tracemalloc.start()
    try:
        program = parse(text, "blank.cnn")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(program.layers) == 1
    assert peak < 64 * 2**20, f"parse() peaked at {peak / 2**20:.0f} MiB"


def test_nul_byte_in_an_import_path(cnn):
    path = cnn(HEADER + 'import "a\0b.cnn"\nlayers:\n    relu\n')
    check_located(path, 4, "NUL byte")


def test_too_many_imports(cnn, tmp_path):
    n = limits.MAX_IMPORTS + 2
    for i in range(n):
        nxt = f'import "f{i + 1}.cnn"\n' if i + 1 < n else ""
        (tmp_path / f"f{i}.cnn").write_text(nxt + f"block b{i}():\n    relu\n")
    path = cnn(HEADER + 'import "f0.cnn"\nlayers:\n    b0()\n')
    r = run_cli("check", str(path))
    assert r.code == 1 and f"more than {limits.MAX_IMPORTS} imported files" in r.err


# ---- numbers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("number, message", [
    ("9" * 5000, "numbers have at most 30 digits"),
    ("1" + "0" * 20, "too large"),
    ("1e999", "too large for a float"),
    ("64x" + "9" * 4400, "numbers have at most 30 digits"),
])
def test_number_literals_out_of_range(cnn, number, message):
    path = cnn(HEADER + f"layers:\n    conv 8 3x3 -> dropout {number}\n")
    check_located(path, 5, message)


def test_arithmetic_that_overflows(cnn):
    path = cnn(HEADER + "layers:\n    conv 2" + "*99999999" * 30 + " 3x3\n")
    check_located(path, 5, "too large")


def test_a_float_that_overflows_in_arithmetic(cnn):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 -> leaky_relu 1e300*1e300\n")
    check_located(path, 5, "too large for a float")


# ---- nesting ------------------------------------------------------------------------------------

@pytest.mark.parametrize("what, body", [
    ("tuples", "    conv 8 3x3 stride=" + "(1," * 300 + "1" + ")" * 300 + "\n"),
    ("groups", "    " + "(" * 300 + "relu" + ")" * 300 + "\n"),
    ("sum", "    conv " + "+".join(["1"] * 600) + " 3x3\n"),
    ("negations", "    conv 8 3x3 -> leaky_relu " + "-" * 600 + "1\n"),
])
def test_deep_nesting_is_refused_before_recursion(cnn, what, body):
    path = cnn(HEADER + "layers:\n" + body)
    check_located(path, 5, "nested more than 64 levels")


def test_redundant_parentheses_cost_nothing(cnn):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 stride=" + "(" * 300 + "1" + ")" * 300 + " -> gap -> dense 10\n")
    r = run_cli("check", str(path))
    assert r.code == 0, r.err


def test_deeply_nested_loops(cnn):
    loops = "".join("    " * (i + 1) + f"for i{i} in range(1):\n" for i in range(250))
    path = cnn(HEADER + "layers:\n" + loops + "    " * 251 + "relu\n")
    check_located(path, 4 + limits.MAX_NESTING + 1, "nested more than 64 levels")


def test_nesting_at_the_limit_works(cnn):
    loops = "".join("    " * (i + 1) + f"for i{i} in range(1):\n" for i in range(limits.MAX_NESTING - 1))
    path = cnn(HEADER + "layers:\n" + loops + "    " * limits.MAX_NESTING + "conv 8 3x3\n"
               + "    gap -> dense 10\n")
    r = run_cli("check", str(path))
    assert r.code == 0, r.err


def test_parse_api_raises_our_errors_only():
    with pytest.raises(CnncError, match="nested more than"):
        parse(HEADER + "layers:\n    " + "(" * 100 + "relu" + ")" * 100 + "\n")
    with pytest.raises((CnncError, CnncErrors)):
        parse(HEADER + "layers:\n    conv " + "7" * 40 + " 3x3\n")


def test_long_lines_are_shown_as_a_window_around_the_caret(cnn):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 " + "-> relu " * 200 + "-> rleu\n")
    r = check_located(path, 5, "unknown layer")
    excerpt = r.err.splitlines()[1]
    assert len(excerpt) < 300 and "…" in excerpt
    caret_line = r.err.splitlines()[2]
    shown = excerpt.split("| ", 1)[1]
    assert shown[caret_line.index("^") - caret_line.index("|") - 2:].startswith("rleu")
