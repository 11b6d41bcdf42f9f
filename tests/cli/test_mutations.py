"""Property test: mutated zoo files (tokens deleted, duplicated, swapped, numbers changed, lines
dropped or repeated) either check cleanly or fail with our located errors — never a crash."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES, run_cli

ZOO = sorted(EXAMPLES.glob("*.cnn"))
TOKEN = re.compile(r"\d+x\d+(?:x\d+)?|\d+\.?\d*(?:e-?\d+)?|[A-Za-z_]\w*|->|//|\S")
LOCATED = re.compile(r"^.+:\d+:\d+: error: .+$", re.M)


def tokens(text: str) -> list[re.Match]:
    return list(TOKEN.finditer(text))


@st.composite
def mutated(draw):
    path = draw(st.sampled_from(ZOO))
    text = path.read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 3))):
        toks = tokens(text)
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "number", "drop_line", "repeat_line", "char"]))
        if kind in ("drop_line", "repeat_line"):
            lines = text.splitlines(keepends=True)
            i = draw(st.integers(0, len(lines) - 1))
            lines[i:i + 1] = [] if kind == "drop_line" else [lines[i], lines[i]]
            text = "".join(lines)
            continue
        if kind == "char":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(list("()=,:*-+/#x\"\t\n 0a"))) + text[at:]
            continue
        i = draw(st.integers(0, len(toks) - 1))
        t = toks[i]
        if kind == "delete":
            text = text[:t.start()] + text[t.end():]
        elif kind == "duplicate":
            text = text[:t.end()] + " " + t.group() + text[t.end():]
        elif kind == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            a, b = sorted((t, toks[j]), key=lambda m: m.start())
            if a.start() != b.start():
                text = text[:a.start()] + b.group() + text[a.end():b.start()] + a.group() + text[b.end():]
        else:
            numbers = [m for m in toks if m.group()[0].isdigit()]
            if numbers:
                m = draw(st.sampled_from(numbers))
                new = draw(st.sampled_from(["0", "1", "2", "3", "7", "13", "64", "255", "0.5", "1x1", "3x3", "-1"]))
                text = text[:m.start()] + new + text[m.end():]
    return path.name, text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_zoo_files_fail_only_with_located_errors(tmp_path_factory, case):
    name, text = case
    path = tmp_path_factory.mktemp("mut") / name
    path.write_text(text, encoding="utf-8")
    r = run_cli("check", str(path))  # an unexpected exception propagates and fails the test
    assert r.code in (0, 1), r.err
    assert "Traceback" not in r.err
    if r.code == 1:
        assert LOCATED.search(r.err), r.err
        assert r.out == ""
    else:
        assert "params:" in r.out
