"""Top-level constants (`width = 1.0`): values seen by layers, blocks, defaults and imported blocks, in
order, hidden by parameters; located errors for their misuse; a blocks-only file says what it is."""

from __future__ import annotations

import pytest

from cnnc.compiler.pipeline import check, run_pipeline
from cnnc.dsl import load_text
from cnnc.dsl.errors import CnncError, CnncErrors


def conv_filters(text: str) -> list[int]:
    g = run_pipeline(load_text(text, "t.cnn"))
    return [d["attrs"].filters for _, d in sorted(g.nodes(data=True)) if d["op"] == "conv"]


def error(text: str, path=None) -> CnncError:
    with pytest.raises((CnncError, CnncErrors)) as info:
        check(path) if path is not None else run_pipeline(load_text(text, "t.cnn"))
    return info.value.errors[0] if isinstance(info.value, CnncErrors) else info.value


def test_constants_reach_layers_blocks_and_defaults_in_order():
    text = ("network t\ninput 3x8x8\nclasses 10\nwidth = 0.5\nwide = make_divisible(64 * width)\n"
            "table = ((16, 1), (24, 2))\ndefault conv groups=g\ng = 1\n"
            "block b(c, k=wide):\n    conv c 1x1 -> conv k 1x1\n"
            "layers:\n    for c, s in table:\n        b(c * s)\n    conv classes + wide 1x1\n")
    assert conv_filters(text) == [16, 32, 48, 32, 42]


def test_a_parameter_or_loop_variable_hides_a_constant():
    text = ("network t\ninput 3x8x8\nc = 5\nblock b(c):\n    conv c 1x1\n"
            "layers:\n    b(7) -> conv c 1x1\n    for c in (9,):\n        conv c 1x1\n    conv c 1x1\n")
    assert conv_filters(text) == [7, 5, 9, 5]


def test_imported_blocks_see_the_network_files_constants(tmp_path):
    (tmp_path / "lib.cnn").write_text("block widen(c):\n    conv c * factor 1x1\n")
    (tmp_path / "net.cnn").write_text('import "lib.cnn"\nnetwork t\ninput 3x8x8\nfactor = 3\n'
                                      "layers:\n    widen(4)\n")
    g = check(tmp_path / "net.cnn")
    assert [d["attrs"].filters for _, d in g.nodes(data=True) if d["op"] == "conv"] == [12]


@pytest.mark.parametrize("lines,line,col,message", [
    ("n = 2\nn = 3\n", 4, 1, "`n` is defined twice"),
    ("conv = 2\n", 3, 1, "`conv` names a layer, a block or `classes`"),
    ("classes = 2\n", 3, 9, "syntax error: unexpected `=`"),  # `classes` is a keyword: `classes 2`
    ("w = widht + 1\n", 3, 5, "`widht` is not defined"),
    ("w = same\n", 3, 5, "`same` is not defined"),
    ("a = b\nb = 1\n", 3, 5, "`b` is not defined"),  # in order: b comes later
    ("w = 1 // 0\n", 3, 5, "division by zero"),
])
def test_misuse_is_a_located_error(lines, line, col, message):
    err = error(f"network t\ninput 3x8x8\n{lines}layers:\n    relu\n")
    assert (err.span.line, err.span.col) == (line, col) and message in err.message, (err.span, err.message)


def test_an_imported_file_may_not_set_constants(tmp_path):
    (tmp_path / "lib.cnn").write_text("factor = 3\nblock widen(c):\n    conv c 1x1\n")
    (tmp_path / "net.cnn").write_text('import "lib.cnn"\nnetwork t\ninput 3x8x8\nlayers:\n    widen(4)\n')
    err = error("", tmp_path / "net.cnn")
    assert "an imported file may only hold blocks" in err.message and "factor = ..." in err.message
    assert (err.span.line, err.span.col) == (1, 1)


def test_a_blocks_only_file_says_so(tmp_path):
    (tmp_path / "lib.cnn").write_text("block widen(c):\n    conv c 1x1\n")
    err = error("", tmp_path / "lib.cnn")
    assert "holds blocks only: there is no network to check" in err.message and "import it" in err.hint
