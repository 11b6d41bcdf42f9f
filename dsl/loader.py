"""Load a `.cnn` file and the files it imports into one `Program`.

`import "path.cnn"` brings in the blocks of another file. The path is resolved relative to
the importing file and must stay inside that file's directory (no escape through `..`,
symlinks or absolute paths) unless the directory it lands in was allowed by the caller
(`cnnc check --import-root DIR`). Import cycles and a block defined in two files are errors.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import ast
from .errors import CnncError
from .parser import parse


def load(path: str | os.PathLike, import_roots: list[str | os.PathLike] = (),
         display_name: str | None = None) -> ast.Program:
    """Parse `path` and every file it imports; the result's `blocks` holds all their blocks."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CnncError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise CnncError(f"{path} is a directory, not a .cnn file") from None
    except UnicodeDecodeError as exc:
        raise CnncError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CnncError(f"cannot read {path}: {exc.strerror}") from None
    roots = [Path(r).resolve() for r in import_roots]
    program = parse(text, display_name or str(path))
    _resolve_imports(program, path.resolve(), roots, stack=[path.resolve()], loaded={})
    return program


def load_text(text: str, name: str = "<string>", base_dir: str | os.PathLike | None = None,
              import_roots: list[str | os.PathLike] = ()) -> ast.Program:
    """Parse text as if it were a file in `base_dir` (imports resolve from there)."""
    program = parse(text, name)
    if program.imports:
        base = Path(base_dir or ".").resolve() / "<text>"
        _resolve_imports(program, base, [Path(r).resolve() for r in import_roots], stack=[base], loaded={})
    return program


def _resolve_imports(program: ast.Program, file: Path, roots: list[Path], stack: list[Path],
                     loaded: dict[Path, ast.Program]) -> None:
    """Merge the blocks of every imported file into `program`; a file imported twice is read once."""
    origin: dict[str, ast.BlockDef] = dict(program.blocks)
    for imp in program.imports:
        target = _confined_path(imp, file, roots)
        if target in stack:
            cycle = " → ".join(p.name for p in stack[stack.index(target):] + [target])
            raise CnncError(f"import cycle: {cycle}", imp.span)
        if target in loaded:
            _merge(origin, loaded[target], imp)
            continue
        try:
            text = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CnncError(f"imported file not found: {imp.path}", imp.span,
                            f"paths are relative to {file.parent}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CnncError(f"cannot read imported file {imp.path}: {exc}", imp.span) from None
        sub = parse(text, _display(target))
        for what, span in (("layers:", sub.layers_span), ("train:", sub.train_span),
                           ("network", sub.network and sub.network[1]), ("input", sub.input_dims and sub.input_dims[1]),
                           ("classes", sub.classes and sub.classes[1])):
            if span:
                raise CnncError(f"an imported file may only hold blocks, defaults and imports; this one has "
                                f"`{what}`", span).with_note(imp.span, "imported here")
        _resolve_imports(sub, target, roots, stack + [target], loaded)
        loaded[target] = sub
        _merge(origin, sub, imp)
    program.blocks = origin


def _merge(origin: dict[str, ast.BlockDef], sub: ast.Program, imp: ast.Import) -> None:
    for name, block in sub.blocks.items():
        if name in origin and origin[name] is not block:
            raise CnncError(f"block `{name}` is defined twice", block.name_span).with_note(
                origin[name].name_span, "also defined here").with_note(imp.span, "imported here")
        origin[name] = block


def _confined_path(imp: ast.Import, file: Path, roots: list[Path]) -> Path:
    base = file.parent
    raw = Path(imp.path)
    target = (raw if raw.is_absolute() else base / raw).resolve()
    allowed = [base, *roots]
    if not any(target == r or r in target.parents for r in allowed):
        raise CnncError(f"import `{imp.path}` leaves the directory of the importing file", imp.span,
                        "imports resolve inside the importing file's directory; allow another "
                        "directory with `--import-root DIR`")
    return target


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)

