"""The package's layers point one way, in pipeline order, and no two modules import each other.

    cnnc CLI (cnnc/) 4 → runtime/ 3 → backends/ 2 → compiler/ 1 → dsl/ 0

Every `.py` file of the five package directories is parsed with `ast`; every import counts, at
module level or inside a function (a deferred import is still a dependency), with relative
imports resolved against the importing module's package. `from P import name` depends on the
module P.name where that is a module, else on P itself. Imports of anything outside `cnnc` are
not looked at. A failure lists each offending import as `file:line`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
# directory → (import name, layer)
PACKAGES = {"dsl": ("cnnc.dsl", 0), "compiler": ("cnnc.compiler", 1), "backends": ("cnnc.backends", 2),
            "runtime": ("cnnc.runtime", 3), "cnnc": ("cnnc", 4)}
LAYER_NAMES = {0: "dsl", 1: "compiler", 2: "backends", 3: "runtime", 4: "cnnc CLI"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module
    file: str  # repository-relative path
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def modules(root: Path = REPO) -> dict[str, Path]:
    """Module name → file, for every .py file under the package directories."""
    out = {}
    for folder, (package, _) in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def layer(module: str) -> int:
    """The layer of a module of the package (the longest matching package prefix)."""
    best = None
    for package, level in PACKAGES.values():
        if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[0])):
            best = (package, level)
    assert best is not None, module
    return best[1]


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports(root: Path = REPO) -> list[Import]:
    """Every import of one module of the package by another, with where it is written."""
    mods = modules(root)
    found = []
    for module, path in mods.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package_of(module, path).split(".")
                    base = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                for alias in node.names:
                    sub = f"{prefix}.{alias.name}"
                    targets.append(sub if sub in mods else prefix)
            for target in targets:
                # `import cnnc.a.b` depends on the innermost module of the package it names
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.append(Import(module, target, rel, node.lineno))
    return list(dict.fromkeys(found))  # `from .viz import a, b` is one import


def upward(found: list[Import]) -> list[str]:
    return [f"{i.where}: {i.source} ({LAYER_NAMES[layer(i.source)]}) imports {i.target} "
            f"({LAYER_NAMES[layer(i.target)]}), a higher layer"
            for i in found if layer(i.target) > layer(i.source)]


def cycles(found: list[Import]) -> list[str]:
    """One report per group of modules that import each other (a strongly connected component),
    with every import inside the group."""
    g = nx.DiGraph()
    for i in found:
        g.add_edge(i.source, i.target)
    out = []
    for group in sorted((c for c in nx.strongly_connected_components(g) if len(c) > 1), key=sorted):
        cycle = next(nx.simple_cycles(g.subgraph(group)))
        lines = [f"import cycle {' → '.join(cycle + [cycle[0]])} (modules {', '.join(sorted(group))}):"]
        lines += [f"    {i.where}: {i.source} imports {i.target}"
                  for i in sorted(found, key=lambda i: (i.file, i.line))
                  if i.source in group and i.target in group]
        out.append("\n".join(lines))
    return out


# ---- the rules, on this repository -----------------------------------------------------------------

def test_no_module_imports_a_higher_layer():
    bad = upward(imports())
    assert not bad, "imports against the layering (cnnc CLI → runtime → backends → compiler → dsl):\n" + "\n".join(bad)


def test_no_import_cycles():
    bad = cycles(imports())
    assert not bad, "\n".join(bad)


# ---- the checker itself, on a small tree --------------------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for folder in PACKAGES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").touch()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_checker_finds_deferred_relative_and_absolute_imports(tmp_path):
    root = _tree(tmp_path, {
        "compiler/a.py": "from . import b\n\ndef f():\n    from cnnc.runtime.model import Model\n",
        "compiler/b.py": "from .a import f\nimport numpy\n",
        "backends/numpy/k.py": "from ..base import X\nfrom cnnc.compiler import a\nfrom cnnc.dsl import name\n",
        "backends/base.py": "",
        "runtime/model.py": "import cnnc.backends.base.X\n",
    })
    found = {(i.source, i.target, i.where) for i in imports(root)}
    assert found == {
        ("cnnc.compiler.a", "cnnc.compiler.b", "compiler/a.py:1"),
        ("cnnc.compiler.a", "cnnc.runtime.model", "compiler/a.py:4"),
        ("cnnc.compiler.b", "cnnc.compiler.a", "compiler/b.py:1"),
        ("cnnc.backends.numpy.k", "cnnc.backends.base", "backends/numpy/k.py:1"),
        ("cnnc.backends.numpy.k", "cnnc.compiler.a", "backends/numpy/k.py:2"),
        ("cnnc.backends.numpy.k", "cnnc.dsl", "backends/numpy/k.py:3"),
        ("cnnc.runtime.model", "cnnc.backends.base", "runtime/model.py:1"),
    }
    assert upward(imports(root)) == ["compiler/a.py:4: cnnc.compiler.a (compiler) imports cnnc.runtime.model "
                                     "(runtime), a higher layer"]
    (report,) = cycles(imports(root))
    assert "compiler/a.py:1" in report and "compiler/b.py:1" in report and "runtime" not in report
