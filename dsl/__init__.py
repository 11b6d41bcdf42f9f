"""The .cnn language: grammar, parser, syntax tree, imports, and the error type with source spans."""

from .errors import CnncError, CnncErrors, Diagnostics, Source, Span
from .loader import load, load_text
from .parser import parse

__all__ = ["CnncError", "CnncErrors", "Diagnostics", "Source", "Span", "load", "load_text", "parse"]
