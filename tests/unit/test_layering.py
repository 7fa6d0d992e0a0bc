"""The import graph of metal_agent/ points one way (issue 24's house plan).

Read from the source with `ast` (`tests.support.import_graph`), so every
import counts: module level, inside functions, under TYPE_CHECKING. Three
rules:

(a) the core imports only the core and the standard library (plus the
    third-party libraries listed in CORE_THIRD_PARTY: none today);
(b) the core has no import cycle;
(c) each package imports only itself and packages ranked below it (RANKS):
    cli -> app -> controller, fleet, memory -> adapters -> (top-level helpers)
    -> core, with the few sideways imports the plan allows (ALLOWED).

Every module must sit in a ranked layer: a new top-level module that is not
ranked fails until it is put in a package (or ranked as a helper).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import metal_agent
from tests.support.import_graph import Import, cycles, imports, is_stdlib, modules

PACKAGE_DIR = Path(metal_agent.__file__).resolve().parent
ROOT = "metal_agent"

#: Third-party libraries the pure core may import (pure ones only: no I/O). None today.
CORE_THIRD_PARTY: frozenset[str] = frozenset()

#: Each layer's rank: a module may import its own layer and any layer ranked lower. A layer
#: is a package under metal_agent/, or a top-level module; "" is metal_agent/__init__.py
#: (the version). Layers of the same rank may not import each other (fleet and controller).
RANKS: dict[str, int] = {
    "core": 0,
    # Top-level helpers that everyone uses, and the package root: they import only the core.
    "": 1,
    "paths": 1,
    "metrics": 1,
    "tasks": 1,
    "logging_setup": 1,
    "adapters": 2,
    "frontdoor": 2,  # the data plane process (issue 21): core and top-level helpers only
    "memory": 3,
    "controller": 4,
    "fleet": 4,
    "app": 5,
    "cli": 6,
    "__main__": 7,
}

#: Sideways imports the plan allows: (importing layer, imported module or package).
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("fleet", "metal_agent.controller.gate"),  # a fleet is a gate (the protocol lives with the controller)
})


def layer_of(module: str, root: str = ROOT) -> str:
    """`root.core.claim` -> "core", `root.paths` -> "paths", `root` -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == root else ""


def in_core(module: str, root: str = ROOT) -> bool:
    return module == f"{root}.core" or module.startswith(f"{root}.core.")


def ours(module: str, root: str = ROOT) -> bool:
    return module == root or module.startswith(f"{root}.")


def core_violations(edges: list[Import], root: str = ROOT,
                    third_party: frozenset[str] = CORE_THIRD_PARTY) -> list[str]:
    """(a): imports by core modules of anything but the core, the standard library and `third_party`."""
    return [str(e) for e in edges if in_core(e.importer, root) and not (
        in_core(e.target, root) or is_stdlib(e.target) or e.target.split(".")[0] in third_party)]


def core_cycles(edges: list[Import], root: str = ROOT) -> list[str]:
    """(b): each cycle among core modules (a group that all reach each other), with the imports among them."""
    inner = [e for e in edges if in_core(e.importer, root) and in_core(e.target, root)]
    found = []
    for group in cycles(inner):
        members = set(group)
        closing = [str(e) for e in inner if e.importer in members and e.target in members]
        found.append(" <-> ".join(group) + ":\n    " + "\n    ".join(closing))
    return found


def layer_violations(edges: list[Import], root: str = ROOT, ranks: dict[str, int] = RANKS,
                     allowed: frozenset[tuple[str, str]] = ALLOWED) -> list[str]:
    """(c): imports of a layer ranked the same or higher, unless allowed sideways."""
    bad = []
    for e in edges:
        if not ours(e.target, root):
            continue
        source, target = layer_of(e.importer, root), layer_of(e.target, root)
        if source == target or source not in ranks:
            continue  # unranked modules are reported by test_every_module_has_a_layer
        if any(source == layer and (e.target == m or e.target.startswith(m + ".")) for layer, m in allowed):
            continue
        if target not in ranks or ranks[target] >= ranks[source]:
            bad.append(f"{e}: {source or root} (rank {ranks[source]}) may not import {target or root}"
                       f" (rank {ranks.get(target, '?')})")
    return bad


def unplaced(known: list[str], root: str = ROOT, ranks: dict[str, int] = RANKS) -> list[str]:
    return [m for m in known if layer_of(m, root) not in ranks]


def fail_listing(what: str, problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{what}:\n  " + "\n  ".join(problems), pytrace=False)


# -- metal_agent/ itself --------------------------------------------------------------


@pytest.fixture(scope="module")
def edges() -> list[Import]:
    return imports(PACKAGE_DIR)


@pytest.fixture(scope="module")
def known() -> list[str]:
    return sorted(modules(PACKAGE_DIR))


def test_the_graph_is_read(edges, known):
    # Guards the rules below against passing on an empty or misread graph.
    assert "metal_agent.core.claim" in known and "metal_agent.cli.main" in known
    assert any(e.importer == "metal_agent.core.claim" and e.target == "metal_agent.core.workload" for e in edges)


def test_core_imports_only_core_and_the_standard_library(edges):
    fail_listing("the core imports outside itself and the standard library", core_violations(edges))


def test_core_has_no_import_cycle(edges):
    fail_listing("import cycles in the core", core_cycles(edges))


def test_layers_import_only_downwards(edges):
    fail_listing("imports against the layer rule (tests/unit/test_layering.py RANKS)", layer_violations(edges))


def test_every_module_has_a_layer(known):
    fail_listing("modules in no ranked layer (put them in a package, or rank them)", unplaced(known))


# -- the rules catch what they are for (on a made-up package) -------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    return write(tmp_path / "pkg", {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "import re\n\ndef f():\n    from pkg.core import b\n",
        "core/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.core.a import f\n",
        "core/c.py": "from ..adapters import io\nimport yaml\n",
        "core/engines/__init__.py": "from pkg.core.engines.one import ONE\n",
        "core/engines/one.py": "from pkg.core.a import f\nONE = 1\n",
        "adapters/__init__.py": "",
        "adapters/io.py": "from pkg.core import c\nfrom pkg.cli import main\n",
        "cli/__init__.py": "",
        "cli/main.py": "from pkg.adapters.io import x\n",
        "stray.py": "",
    })


def test_function_level_and_type_checking_imports_count_and_close_a_cycle(fake):
    edges = imports(fake)
    found = core_cycles(edges, root="pkg")
    assert len(found) == 1 and found[0].startswith("pkg.core.a <-> pkg.core.b:")
    assert "pkg/core/a.py:4 (pkg.core.a imports pkg.core.b)" in found[0]
    assert "pkg/core/b.py:3 (pkg.core.b imports pkg.core.a)" in found[0]
    # A package's __init__ importing its own engine is no cycle (the implicit parent import is not an edge).
    assert not any("engines" in c for c in found)


def test_the_core_may_not_reach_outside_itself(fake):
    bad = core_violations(imports(fake), root="pkg")
    assert bad == ["pkg/core/c.py:1 (pkg.core.c imports pkg.adapters.io)", "pkg/core/c.py:2 (pkg.core.c imports yaml)"]
    assert core_violations(imports(fake), root="pkg", third_party=frozenset({"yaml"})) == bad[:1]


def test_upward_imports_are_named_by_line(fake):
    ranks = {"core": 0, "adapters": 2, "memory": 3, "cli": 6}
    bad = layer_violations(imports(fake), root="pkg", ranks=ranks, allowed=frozenset())
    assert len(bad) == 2
    assert bad[0].startswith("pkg/adapters/io.py:2 (pkg.adapters.io imports pkg.cli.main): adapters (rank 2) may not"
                             " import cli")
    assert bad[1].startswith("pkg/core/c.py:1 (pkg.core.c imports pkg.adapters.io): core (rank 0) may not import adapters")
    # cli -> adapters is fine (downwards).
    assert layer_violations(imports(fake), root="pkg", ranks=ranks,
                            allowed=frozenset({("adapters", "pkg.cli.main")})) == bad[1:]


def test_unplaced_modules_fail(fake):
    known = sorted(modules(fake))
    ranks = {"core": 0, "adapters": 2, "cli": 6, "": 1}
    assert unplaced(known, root="pkg", ranks=ranks) == ["pkg.stray"]
