"""Load a `.cnn` file and the files it imports into one `Program`.

`import "path.cnn"` brings in the blocks of another file. The path is resolved relative to
the importing file and must stay inside that file's directory (no escape through `..`,
symlinks or absolute paths) unless the directory it lands in was allowed by the caller
(`cnnc check --import-root DIR`). Import cycles and a block defined in two files are errors.

Files are read by `read_source`: regular files only (a FIFO or a device such as /dev/zero would
block or never end), at most MAX_SOURCE_BYTES, UTF-8 with the line and column of a bad byte.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import ast
from .errors import CnncError, Source, Span
from .limits import MAX_IMPORTS, MAX_SOURCE_BYTES
from .parser import parse, too_large


class NotARegularFile(ValueError):
    """A path that names a directory, a FIFO, a device or a socket; `kind` says which."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of a regular file (one more than allowed tells the caller it is
    too large). Opened non-blocking, so a FIFO is refused instead of waited on; raises OSError,
    or NotARegularFile."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                                  else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                                  else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_source(path: Path, display: str, where: Span | None = None, what: str = "file") -> str:
    """The text of a .cnn file, or a CnncError (at `where`, an import line, when given)."""
    if "\0" in str(path):
        raise CnncError(f"the {what} name {str(path)!r} contains a NUL byte", where)
    try:
        data = read_regular_file(path, MAX_SOURCE_BYTES)
    except FileNotFoundError:
        raise CnncError(f"no such {what}: {display}", where) from None
    except NotARegularFile as exc:
        raise CnncError(f"{display} is {exc.kind}, not a .cnn file", where,
                        None if exc.kind == "a directory" else "cnnc reads .cnn sources from regular files only") \
            from None
    except OSError as exc:
        raise CnncError(f"cannot read {display}: {exc.strerror}", where) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise too_large(display, where)
    return decode_source(data, display)


def decode_source(data: bytes, display: str) -> str:
    """UTF-8 text; a bad byte is reported at its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        source = Source(display, data.decode("utf-8", errors="replace"))
        raise CnncError(f"the file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot start or continue "
                        "a character here", Span(source, line, col, line, col + 1),
                        "save the file as UTF-8") from None


def load(path: str | os.PathLike, import_roots: list[str | os.PathLike] = (),
         display_name: str | None = None) -> ast.Program:
    """Parse `path` and every file it imports; the result's `blocks` holds all their blocks."""
    path = Path(path)
    text = read_source(path, display_name or str(path))
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
        if len(loaded) + len(stack) >= MAX_IMPORTS:
            raise CnncError(f"more than {MAX_IMPORTS} imported files", imp.span,
                            "imports bring in blocks; a network needs a handful of files")
        if not target.exists():
            raise CnncError(f"imported file not found: {imp.path}", imp.span, f"paths are relative to {file.parent}")
        text = read_source(target, _display(target), imp.span, "imported file")
        sub = parse(text, _display(target))
        for what, span in (("layers:", sub.layers_span), ("train:", sub.train_span),
                           ("network", sub.network and sub.network[1]), ("input", sub.input_dims and sub.input_dims[1]),
                           ("classes", sub.classes and sub.classes[1]),
                           (sub.constants and f"{sub.constants[0][0]} = ...", sub.constants and sub.constants[0][2])):
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
    if "\0" in imp.path:
        raise CnncError("an import path cannot contain a NUL byte", imp.span)
    raw = Path(imp.path)
    try:
        target = (raw if raw.is_absolute() else base / raw).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise CnncError(f"cannot resolve import `{imp.path}`: {exc}", imp.span) from None
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

