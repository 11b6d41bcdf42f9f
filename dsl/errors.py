"""Source files, spans, the one user-error type that every stage of cnnc raises, and the internal one.

A `Span` points into a `Source` (file name + text). `CnncError` carries a span, a hint and
notes (other spans, e.g. a block call site or the other operand of an `add`). It renders
chibicc-style: `file:line:col: error: message`, the source line, a caret underline.
`Diagnostics` collects several independent errors so that one run reports them all.
`InternalError` is the other kind: a bug in cnnc, not a mistake of the user's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import MAX_ERRORS


@dataclass(frozen=True, eq=False)
class Source:
    """A `.cnn` file's name (as the user should see it) and its text."""

    name: str
    text: str = field(repr=False)

    def line_text(self, line: int) -> str:
        if line < 1:
            return ""
        # walk the line starts instead of splitting: errors are rendered from big files too
        start = 0
        for _ in range(line - 1):
            start = self.text.find("\n", start) + 1
            if start == 0:
                return ""
        end = self.text.find("\n", start)
        text = self.text[start:] if end < 0 else self.text[start:end]
        return text.removesuffix("\r")


@dataclass(frozen=True)
class Span:
    """A region of a source: 1-based line and column, end exclusive on the same or a later line."""

    source: Source
    line: int
    col: int
    end_line: int
    end_col: int

    @property
    def file(self) -> str:
        return self.source.name

    def __str__(self) -> str:
        return f"{self.source.name}:{self.line}:{self.col}"

    def __repr__(self) -> str:
        return f"Span({self})"

    def to(self, other: "Span") -> "Span":
        """The span from the start of self to the end of other."""
        return Span(self.source, self.line, self.col, other.end_line, other.end_col)

    def excerpt(self) -> str:
        """The source line and a caret underline under the spanned columns.

        A line longer than EXCERPT_WIDTH is shown as the window around the caret."""
        text = self.source.line_text(self.line)
        end = self.end_col if self.end_line == self.line else len(text) + 1
        col = self.col
        if len(text) > EXCERPT_WIDTH:
            start = max(0, min(col - 1 - EXCERPT_WIDTH // 4, len(text) - EXCERPT_WIDTH))
            text = ("…" if start else "") + text[start:start + EXCERPT_WIDTH] + \
                ("…" if start + EXCERPT_WIDTH < len(text) else "")
            shift = start - (1 if start else 0)
            col, end = col - shift, min(end - shift, EXCERPT_WIDTH + 2)
        width = max(1, min(end, len(text) + 1) - col)
        gutter = f"{self.line:>5} | "
        pad = "".join("\t" if ch == "\t" else " " for ch in text[: col - 1])
        return f"{gutter}{text}\n{' ' * (len(gutter) - 2)}| {pad}^{'~' * (width - 1)}"


EXCERPT_WIDTH = 240  # characters of a source line shown under an error


@dataclass
class Note:
    span: Span | None
    message: str


@dataclass
class CnncError(Exception):
    """A user mistake with its location. Raised by the parser, the graph builder and every pass."""

    message: str
    span: Span | None = None
    hint: str | None = None
    notes: list[Note] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def with_note(self, span: Span | None, message: str) -> "CnncError":
        self.notes.append(Note(span, message))
        return self

    kind = "error"

    def render(self) -> str:
        where = f"{self.span}: " if self.span else ""
        out = [f"{where}{self.kind}: {self.message}"]
        if self.span:
            out.append(self.span.excerpt())
        for note in self.notes:
            if note.span:
                out.append(f"{note.span}: note: {note.message}")
                out.append(note.span.excerpt())
            else:
                out.append(f"note: {note.message}")
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def to_dict(self) -> dict:
        loc = None
        if self.span:
            loc = {"file": self.span.file, "line": self.span.line, "col": self.span.col,
                   "end_line": self.span.end_line, "end_col": self.span.end_col}
        return {"message": self.message, "location": loc, "hint": self.hint,
                "notes": [{"message": n.message, "location": str(n.span) if n.span else None}
                          for n in self.notes]}


class CnncWarning(CnncError):
    """Not a mistake for certain, but worth a look (a layer whose result is never used)."""

    kind = "warning"


class CnncErrors(Exception):
    """Several independent errors, reported together."""

    def __init__(self, errors: list[CnncError]):
        super().__init__(f"{len(errors)} error(s)")
        self.errors = errors

    def render(self) -> str:
        body = "\n\n".join(e.render() for e in self.errors)
        n = len(self.errors)
        return f"{body}\n\n{n} error{'s' if n != 1 else ''} generated."


class InternalError(Exception):
    """A bug in cnnc (a broken invariant), never a user mistake: reported with "please report"."""


class Diagnostics:
    """Collects errors from a stage that can go on after a mistake; `check()` raises them all.

    At MAX_ERRORS distinct errors it stops the stage (as compilers' -fmax-errors does): one
    mistake repeated in a long loop is not worth minutes of messages.
    """

    def __init__(self) -> None:
        self.errors: list[CnncError] = []
        self._keys: set[tuple[str, str]] = set()
        self.truncated = False

    def add(self, err: CnncError) -> None:
        key = (str(err.span), err.message)
        if key in self._keys:
            return
        self._keys.add(key)
        self.errors.append(err)
        if len(self.errors) >= MAX_ERRORS:
            self.truncated = True
            self.check()

    def __bool__(self) -> bool:
        return bool(self.errors)

    def check(self) -> None:
        if self.errors:
            self.errors.sort(key=lambda e: (e.span.file, e.span.line, e.span.col) if e.span else ("", 0, 0))
            errors = list(self.errors)
            if self.truncated:
                errors.append(CnncError(f"too many errors ({MAX_ERRORS}); stopping here",
                                        hint="fix these first and check again"))
            raise CnncErrors(errors)


def did_you_mean(word: str, choices, same=None) -> str | None:
    """A 'did you mean' hint for a misspelt name, or None when nothing is close. `same(choice)` names
    what a choice stands for: of several spellings of one thing (an op and its aliases) only the
    closest is offered."""
    import difflib

    close, seen = [], set()
    for c in difflib.get_close_matches(word, list(choices), n=9, cutoff=0.6):
        key = same(c) if same else c
        if key not in seen:
            seen.add(key)
            close.append(c)
    close = close[:3]
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
