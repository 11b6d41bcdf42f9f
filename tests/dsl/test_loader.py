"""Imports: relative to the importing file, confined to its directory unless allowed; cycles; duplicates."""

from __future__ import annotations

import pytest

from cnnc.dsl import load
from cnnc.dsl.errors import CnncError

from conftest import run_cli

BLOCKS = "block unit(c):\n    conv c 3x3 pad=1 -> relu\n"
MAIN = 'network t\ninput 3x8x8\nimport "{path}"\nlayers:\n    unit(4) -> unit(8)\n'


def test_import_relative_to_the_importing_file(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "blocks.cnn").write_text('import "more.cnn"\n' + BLOCKS)
    (tmp_path / "lib" / "more.cnn").write_text("block other():\n    relu\n")
    (tmp_path / "net.cnn").write_text(MAIN.format(path="lib/blocks.cnn"))
    program = load(tmp_path / "net.cnn")
    assert set(program.blocks) == {"unit", "other"}
    r = run_cli("check", str(tmp_path / "net.cnn"), "--json")
    assert r.code == 0, r.err


def test_import_cannot_escape_through_dotdot(tmp_path):
    (tmp_path / "blocks.cnn").write_text(BLOCKS)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "net.cnn").write_text(MAIN.format(path="../blocks.cnn"))
    r = run_cli("check", str(tmp_path / "sub" / "net.cnn"))
    assert r.code == 1
    assert r.first_error()[1:] == (3, 8, "import `../blocks.cnn` leaves the directory of the importing file")
    assert "--import-root" in r.err
    r = run_cli("check", str(tmp_path / "sub" / "net.cnn"), "--import-root", str(tmp_path))
    assert r.code == 0, r.err


def test_import_cannot_use_absolute_paths(tmp_path):
    (tmp_path / "blocks.cnn").write_text(BLOCKS)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "net.cnn").write_text(MAIN.format(path=str(tmp_path / "blocks.cnn")))
    with pytest.raises(CnncError, match="leaves the directory"):
        load(tmp_path / "sub" / "net.cnn")


def test_import_through_a_symlink_out_is_refused(tmp_path):
    (tmp_path / "outside.cnn").write_text(BLOCKS)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blocks.cnn").symlink_to(tmp_path / "outside.cnn")
    (tmp_path / "sub" / "net.cnn").write_text(MAIN.format(path="blocks.cnn"))
    with pytest.raises(CnncError, match="leaves the directory"):
        load(tmp_path / "sub" / "net.cnn")


def test_import_cycle(tmp_path):
    (tmp_path / "a.cnn").write_text('import "b.cnn"\n' + BLOCKS)
    (tmp_path / "b.cnn").write_text('import "a.cnn"\nblock other():\n    relu\n')
    (tmp_path / "net.cnn").write_text(MAIN.format(path="a.cnn"))
    with pytest.raises(CnncError, match=r"import cycle: a.cnn → b.cnn → a.cnn"):
        load(tmp_path / "net.cnn")


def test_missing_import(tmp_path):
    (tmp_path / "net.cnn").write_text(MAIN.format(path="nope.cnn"))
    r = run_cli("check", str(tmp_path / "net.cnn"))
    assert r.code == 1 and r.first_error()[1:] == (3, 8, "imported file not found: nope.cnn")


def test_block_defined_in_two_files(tmp_path):
    (tmp_path / "blocks.cnn").write_text(BLOCKS)
    (tmp_path / "net.cnn").write_text(MAIN.format(path="blocks.cnn") + BLOCKS)
    with pytest.raises(CnncError, match="block `unit` is defined twice"):
        load(tmp_path / "net.cnn")


def test_imported_file_with_layers_is_refused(tmp_path):
    (tmp_path / "blocks.cnn").write_text(BLOCKS + "layers:\n    relu\n")
    (tmp_path / "net.cnn").write_text(MAIN.format(path="blocks.cnn"))
    with pytest.raises(CnncError, match="may only hold blocks"):
        load(tmp_path / "net.cnn")


def test_syntax_error_in_imported_file_names_that_file(tmp_path):
    (tmp_path / "blocks.cnn").write_text("block unit(c):\n    conv c 3x3 pad=\n")
    (tmp_path / "net.cnn").write_text(MAIN.format(path="blocks.cnn"))
    r = run_cli("check", str(tmp_path / "net.cnn"))
    assert r.code == 1 and r.first_error()[0].endswith("blocks.cnn") and r.first_error()[1] == 2


def test_defaults_apply_to_the_file_they_are_written_in(tmp_path):
    (tmp_path / "blocks.cnn").write_text("default conv bias=false\n" + BLOCKS)
    (tmp_path / "net.cnn").write_text('network t\ninput 3x8x8\nimport "blocks.cnn"\nlayers:\n'
                                      '    unit(4) -> conv 4 1x1\n')
    import json
    r = run_cli("check", str(tmp_path / "net.cnn"), "--json")
    layers = {x["name"]: x["params"] for x in json.loads(r.out)["layers"]}
    assert layers["unit1.conv1"] == 4 * 3 * 9  # no bias: the block's file says so
    assert layers["conv1"] == 4 * 4 + 4  # bias: the main file has no default


def test_diamond_imports_are_read_once(tmp_path):
    (tmp_path / "c.cnn").write_text("block leaf():\n    relu\n")
    (tmp_path / "a.cnn").write_text('import "c.cnn"\nblock unit(c):\n    leaf() -> conv c 3x3 pad=1\n')
    (tmp_path / "b.cnn").write_text('import "c.cnn"\nblock other():\n    leaf()\n')
    (tmp_path / "net.cnn").write_text('network t\ninput 3x8x8\nimport "a.cnn"\nimport "b.cnn"\nimport "c.cnn"\n'
                                      'layers:\n    unit(4) -> other()\n')
    assert set(load(tmp_path / "net.cnn").blocks) == {"leaf", "unit", "other"}


def test_imported_file_with_network_header_is_refused(tmp_path):
    (tmp_path / "blocks.cnn").write_text("network other\n" + BLOCKS)
    (tmp_path / "net.cnn").write_text(MAIN.format(path="blocks.cnn"))
    with pytest.raises(CnncError, match="may only hold blocks"):
        load(tmp_path / "net.cnn")
