"""Every field of LLMKube's InferenceService and Model has a row in `core.fields`, and every row a field.

Why: a field a user sets must be honoured or refused with a reason, never
dropped without a word. LLMKube adds fields often; this test reads its CRDs
from the vendored tarball, so a new field fails here, by name, until someone
decides what the agent does with it (and the README's table says so).
"""

from __future__ import annotations

import pytest

from metal_agent.core import fields
from metal_agent.core.fields import ISVC, MODEL, Treatment
from tests.support.llmkube import crds_from_tarball, find_tarball

KINDS = (ISVC, MODEL)


def _spec_schema(crds: list[dict], kind: str) -> dict:
    crd = next(c for c in crds if c["spec"]["group"] == "inference.llmkube.dev" and c["spec"]["names"]["kind"] == kind)
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _children(node: dict, path: str) -> list[tuple[str, dict]]:
    found = [(f"{path}.{name}", child) for name, child in node.get("properties", {}).items()]
    items = node.get("items")
    if isinstance(items, dict) and items.get("properties"):
        found += [(f"{path}[].{name}", child) for name, child in items["properties"].items()]
    return found


def unaccounted(node: dict, path: str, kind: str) -> list[str]:
    """The fields below `node` with no row: a leaf needs its own (or a subtree row above it);
    an object or list of objects is accounted for when each of its fields is."""
    missing: list[str] = []
    for child_path, child in _children(node, path):
        if fields.row_for(kind, child_path) is not None:
            continue
        if _children(child, child_path):
            missing += unaccounted(child, child_path, kind)
        else:
            missing.append(child_path)
    return missing


def all_paths(node: dict, path: str) -> set[str]:
    paths: set[str] = set()
    for child_path, child in _children(node, path):
        paths.add(child_path)
        paths |= all_paths(child, child_path)
    return paths


@pytest.fixture(scope="module")
def llmkube_crds() -> list[dict]:
    tarball = find_tarball()
    if tarball is None:
        pytest.skip("no LLMKube source tarball (../shared/vendor/llmkube-*.tar.gz): only developers and CI have it")
    return crds_from_tarball(tarball)


@pytest.mark.parametrize("kind", KINDS)
def test_every_llmkube_field_has_a_row(kind, llmkube_crds):
    missing = unaccounted(_spec_schema(llmkube_crds, kind), "spec", kind)
    assert not missing, (f"{kind} fields of LLMKube's CRD that metal-agent neither honours, refuses nor calls"
                         " not applicable: add a row to metal_agent/core/fields.py for each:\n" + "\n".join(missing))


@pytest.mark.parametrize("kind", KINDS)
def test_every_row_names_a_field_llmkube_has(kind, llmkube_crds):
    paths = all_paths(_spec_schema(llmkube_crds, kind), "spec")
    stale = [row.path for row in fields.rows(kind) if row.path not in paths]
    assert not stale, f"rows for {kind} fields LLMKube's CRD no longer has: {stale}"


# The walk itself, on a small schema: it can fail.

def test_walk_names_a_field_without_a_row():
    schema = {"properties": {"modelRef": {"type": "string"}, "brandNew": {"type": "object", "properties": {
        "knob": {"type": "integer"}}}, "affinity": {"type": "object", "properties": {"x": {"type": "string"}}}}}
    assert unaccounted(schema, "spec", ISVC) == ["spec.brandNew.knob"]


def test_rows_are_unique_and_explained():
    keys = [(row.kind, row.path) for row in fields.FIELDS]
    assert len(keys) == len(set(keys))
    assert all(row.text.strip() for row in fields.FIELDS)
    assert {row.treatment for row in fields.FIELDS} == set(Treatment)
