"""Every import statement of a Python package, read with `ast` (nothing is imported or run).

`tests/unit/test_layering.py` holds metal_agent/ to its layer rule with it.
Every `import` and `from ... import` counts wherever it is written: at
module level, inside a function (the usual way to hide a cycle), under
`if TYPE_CHECKING:` (a cycle for the type checker and for readers), in a
`try:`. A `from a.b import c` is an import of the module `a.b.c` when that
module exists, else of `a.b`. Importing `a.b.c` also runs the package
`a.b`'s `__init__`; that implicit edge is not counted, as in Python, where
a package's `__init__` importing its own submodules is no cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Import:
    """`importer` imports `target` (a dotted module name) at `path`:`line`."""

    importer: str
    target: str
    path: str  # relative to the package's parent, as a reader would open it
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()} ({self.importer} imports {self.target})"


def modules(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py file under `package_dir` (a package's `__init__` is the package)."""
    found: dict[str, Path] = {}
    base = package_dir.parent
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(package_dir: Path) -> list[Import]:
    """Every import statement in every module under `package_dir`, resolved to module names."""
    known = modules(package_dir)
    found: list[Import] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        shown = str(path.relative_to(package_dir.parent))
        for target, line in _statements(tree, name, path.name == "__init__.py", known):
            found.append(Import(name, target, shown, line))
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def _statements(tree: ast.AST, module: str, is_package: bool,
                known: Mapping[str, Path]) -> Iterable[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in known else base), node.lineno


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from` statement names, relative imports resolved against `module`."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def cycles(edges: Iterable[Import]) -> list[list[str]]:
    """The import cycles among the modules of `edges`: each strongly connected group of two or
    more modules (or one importing itself), as a sorted list, found with Tarjan's algorithm."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(groups)
