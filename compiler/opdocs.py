"""The language reference's op tables and `cnnc ops`, generated from the op table.

`summary()` is one row per layer a `.cnn` file may use: aliases, positional arguments,
attributes with their defaults, output shape, parameters, MACs, and its PyTorch and ONNX
equivalents. `activations()` gives every element-wise op's formula and derivative, the
expressions every backend renders. docs/language.md holds both between `<!-- ops:NAME -->` and
`<!-- /ops:NAME -->` markers; `update(text)` rewrites those regions, and a test checks that the
file is up to date (`python -m cnnc.compiler.opdocs docs/language.md` rewrites it).
"""

from __future__ import annotations

import re
import sys

from .ops import OPS, Attrs, OpDef

_COMMON = set(Attrs.model_fields)


def _value(v, info=None) -> str:
    if v is None:  # an optional attribute without a value: its description says what it means
        return (info.description if info is not None and info.description else "unset")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple) and v and all(isinstance(x, int) for x in v):
        return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fields(op: OpDef) -> list[tuple[str, object, bool]]:
    """(name, default text, required) of an op's own attributes."""
    return [(k, _value(f.default, f), f.is_required()) for k, f in op.attrs.model_fields.items() if k not in _COMMON]


def _positional(op: OpDef) -> str:
    if op.tensor_args:
        return "tensors"
    fields = {k: (d, req) for k, d, req in _fields(op)}
    out = []
    for p in op.positional:
        d, req = fields[p]
        out.append(p if req or d == "unset" else f"{p} ({d})")
    return ", ".join(out)


def _attributes(op: OpDef) -> str:
    return " ".join(f"`{k}={d}`" for k, d, req in _fields(op) if k not in op.positional and not req)


def _code(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


def summary() -> str:
    rows = ["| layer | aliases | positional | attributes (default) | output shape | params | MACs | PyTorch | ONNX |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, op in OPS.items():
        if not op.user:
            continue
        torch = op.torch_doc or (op.torch if isinstance(op.torch, str) else "")
        rows.append(f"| `{name}` | {_code(op.aliases)} | {_positional(op)} | {_attributes(op)} | {op.out_doc} | "
                    f"{op.params_doc} | {op.macs_doc} | {f'`{torch}`' if torch else ''} | {op.onnx or ''} |")
    return "\n".join(rows)


def activations() -> str:
    rows = ["| layer | y = f(x) | f′ | backward keeps | meaning |", "|---|---|---|---|---|"]
    for name, op in OPS.items():
        if op.formula is None or not op.user:
            continue
        f = op.formula
        args = "".join(f" <{p}>" for p in f.params)
        aliases = f" (also {_code(op.aliases)})" if op.aliases else ""
        keeps = " and ".join(sorted(f.grad_reads)) or "nothing"
        rows.append(f"| `{name}{args}`{aliases} | `{f.forward}` | `{f.derivative}` | {keeps} | {op.doc} |")
    return "\n".join(rows)


def describe(name: str) -> dict:
    """One layer as data (what `cnnc ops NAME --json` prints)."""
    op = OPS[name]
    out = {"layer": name, "doc": op.doc, "aliases": list(op.aliases), "positional": _positional(op),
           "attributes": {k: (None if req else d) for k, d, req in _fields(op)},
           "output": op.out_doc, "params": op.params_doc, "macs": op.macs_doc, "kind": op.kind,
           "pattern": op.pattern.value, "pytorch": op.torch_doc or (op.torch if isinstance(op.torch, str) else None),
           "onnx": op.onnx}
    if op.formula is not None:
        out.update(formula=op.formula.forward, derivative=op.formula.derivative,
                   backward_keeps=sorted(op.formula.grad_reads))
    return out


SECTIONS = {"summary": summary, "activations": activations}


def update(text: str) -> str:
    """`text` with every `<!-- ops:NAME -->` … `<!-- /ops:NAME -->` region regenerated."""
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- ops:{name} -->\n)(?:.*?\n)?(<!-- /ops:{name} -->)", re.S)
        text, n = pattern.subn(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
        if n != 1:
            raise ValueError(f"expected one `<!-- ops:{name} -->` region, found {n}")
    return text


if __name__ == "__main__":  # python -m cnnc.compiler.opdocs docs/language.md
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        old = f.read()
    new = update(old)
    if new != old:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    print(f"{path}: {'updated' if new != old else 'up to date'}")
