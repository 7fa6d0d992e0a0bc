"""Size rules from the team's guide: no module over 500 lines, no function over 80 (issue 24).

A module that long, or a function that long, does more than one job and hides
the seam where it should be cut. Read with `ast` (nothing is imported), like
tests/unit/test_layering.py: a function's size runs from the first line of its
body (its docstring, if any) to its last line, so a nested function counts
inside its parent and on its own. The signature is left out because a typer
command declares its flags there: `metal-agent run`'s 70 options are a table,
one line each, not logic, and the rule is about logic. A failure names each file:line and its size, so the fix
starts at the right place.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import metal_agent

PACKAGE_DIR = Path(metal_agent.__file__).resolve().parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

#: Modules allowed over MAX_MODULE_LINES for now, path relative to metal_agent/'s parent.
#: Each entry says why and who removes it; an entry that is no longer needed fails, so the list
#: only shrinks.
EXCEPTIONS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Oversize:
    """Something at `path`:`line` that is `lines` long where `limit` is allowed."""

    what: str
    path: str
    line: int
    lines: int
    limit: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.what} is {self.lines} lines (limit {self.limit})"


def python_files(package_dir: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(package_dir.rglob("*.py")):
        yield str(path.relative_to(package_dir.parent)), path


def line_count(text: str) -> int:
    return len(text.splitlines())


def function_sizes(tree: ast.AST) -> Iterator[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function and method, nested ones too."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                name = prefix + child.name
                yield name, first, (child.end_lineno or child.lineno) - child.body[0].lineno + 1
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def oversized(package_dir: Path, max_module: int = MAX_MODULE_LINES, max_function: int = MAX_FUNCTION_LINES,
              exceptions: frozenset[str] = frozenset()) -> list[Oversize]:
    found: list[Oversize] = []
    for shown, path in python_files(package_dir):
        text = path.read_text(encoding="utf-8")
        lines = line_count(text)
        if lines > max_module and shown not in exceptions:
            found.append(Oversize("module", shown, 1, lines, max_module))
        for name, first, size in function_sizes(ast.parse(text, filename=str(path))):
            if size > max_function:
                found.append(Oversize(f"function {name}", shown, first, size, max_function))
    return found


def stale_exceptions(package_dir: Path, exceptions: frozenset[str], max_module: int = MAX_MODULE_LINES) -> list[str]:
    """EXCEPTIONS entries whose module is gone or no longer over the limit."""
    sizes = {shown: line_count(path.read_text(encoding="utf-8")) for shown, path in python_files(package_dir)}
    return sorted(e for e in exceptions if sizes.get(e, 0) <= max_module)


def fail_listing(what: str, problems: list[object]) -> None:
    if problems:
        pytest.fail(f"{what}:\n  " + "\n  ".join(map(str, problems)), pytrace=False)


# -- metal_agent/ itself ----------------------------------------------------------------


def test_no_module_over_500_lines_and_no_function_over_80():
    fail_listing("too long (split along a seam: one module, one job)", oversized(PACKAGE_DIR, exceptions=EXCEPTIONS))


def test_exceptions_list_only_modules_still_over_the_limit():
    fail_listing("EXCEPTIONS entries to remove (gone, or now within the limit)",
                 stale_exceptions(PACKAGE_DIR, EXCEPTIONS))


def test_the_package_is_read():
    # Guards the rules above against passing on an empty or misread tree.
    files = dict(python_files(PACKAGE_DIR))
    assert "metal_agent/cli/main.py" in files
    names = [name for name, _, _ in function_sizes(ast.parse(files["metal_agent/cli/main.py"].read_text()))]
    assert names


# -- the rules catch what they are for (on a made-up package) -------------------------------


def test_long_modules_and_functions_are_named_by_line_and_size(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    (pkg / "a.py").write_text(
        "import os\n"
        "\n"
        "@staticmethod\n"
        f"def long(\n    a=1,\n    b=2,\n):\n{body}\n"  # decorator on line 3, body lines 8-12: 5 lines
        "\n"
        "class C:\n"
        f"    async def method(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n"  # body 16-22: 7, inner included
        "        def inner():\n"
        "            return 1\n"
        "\n"
        "def short():\n    return 2\n")
    (pkg / "b.py").write_text("\n" * 30)
    found = [str(o) for o in oversized(pkg, max_module=25, max_function=4)]
    assert found == [
        "pkg/a.py:3 function long is 5 lines (limit 4)",
        "pkg/a.py:15 function C.method is 7 lines (limit 4)",
        "pkg/b.py:1 module is 30 lines (limit 25)",
    ]
    assert oversized(pkg, max_module=25, max_function=4, exceptions=frozenset({"pkg/b.py"}))[-1].path == "pkg/a.py"
    assert stale_exceptions(pkg, frozenset({"pkg/b.py", "pkg/a.py", "pkg/gone.py"}), max_module=25) == [
        "pkg/a.py", "pkg/gone.py"]
