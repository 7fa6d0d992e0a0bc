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


# -- No field silently ignored: the table's refusals are what the agent refuses ---------------

#: A value a user might set for each field the table refuses (or a value it refuses).
REFUSED_EXAMPLES = {
    (ISVC, "spec.autoscaling"): {"minReplicas": 1, "maxReplicas": 3},
    (ISVC, "spec.turboQuantBits"): 3,
    (ISVC, "spec.pagedSSDCacheDir"): "/Volumes/ssd/omlx",
    (ISVC, "spec.pagedSSDCacheMaxSize"): "200GB",
    (ISVC, "spec.hotCacheMaxSize"): "50GB",
    (ISVC, "spec.args"): ["--threads", "4"],
    (ISVC, "spec.command"): ["/bin/sh"],
    (ISVC, "spec.env"): [{"name": "LLAMA_ARG_MODEL", "value": "/etc/passwd"}],
    (ISVC, "spec.bindAddress"): "::",
    (ISVC, "spec.endpoint.type"): "LoadBalancer",
    (ISVC, "spec.endpoint.nodePort"): 30080,
    (MODEL, "spec.refreshPolicy"): "OnChange",
}


def _with(doc: dict, path: str, value) -> dict:
    node = doc
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


def test_every_refusal_of_the_table_has_an_example():
    enforced = {(row.kind, row.path) for row in fields.FIELDS if row.refuse_when is not None}
    assert enforced == set(REFUSED_EXAMPLES)


@pytest.mark.parametrize("kind,path", sorted(REFUSED_EXAMPLES), ids=lambda v: v)
def test_a_refused_field_refuses_the_spec_by_name(kind, path):
    from metal_agent.core.claim import evaluate
    from metal_agent.core.result import Invalid
    from metal_agent.core.spec_policy import spec_reason
    from tests.support.manifests import isvc_doc, model_doc

    isvc, model = isvc_doc(), model_doc()
    _with(isvc if kind == ISVC else model, path, REFUSED_EXAMPLES[(kind, path)])
    outcome = evaluate(isvc, model)
    assert isinstance(outcome, Invalid)
    [error] = outcome.errors
    assert (error.kind, error.path, error.reason) == (kind, path, fields.UNSUPPORTED_FIELD)
    assert path in error.describe() and "cannot be honoured by metal-agent" in error.message
    assert spec_reason(e.reason for e in outcome.errors) == "UnsupportedField"


def test_values_that_ask_for_nothing_are_not_refused():
    """Defaults, false, empty: what the agent does anyway, so nothing to refuse."""
    spec = {"rolloutPolicy": {"waitForIdle": False, "idleTimeoutSeconds": 300, "force": True},
            "endpoint": {"port": 8080, "type": "ClusterIP", "path": "/v1/chat/completions"},
            "env": [], "args": [], "autoscaling": {}, "maxPodLifetimeIdleTimeoutSeconds": 0}
    assert fields.refusals(ISVC, spec, "ns/x") == ()
    assert fields.refusals(MODEL, {"refreshPolicy": "IfNotPresent", "files": [], "mmproj": ""}, "ns/m") == ()


def test_llmkubes_defaults_are_never_refused(llmkube_crds):
    """Every default LLMKube's CRD writes into a stored object: none may turn into a refusal."""
    for kind in KINDS:
        def defaults(node: dict, path: str):
            for child_path, child in _children(node, path):
                if "default" in child and "[]" not in child_path:
                    yield child_path, child["default"]
                yield from defaults(child, child_path)

        for path, value in defaults(_spec_schema(llmkube_crds, kind), "spec"):
            row = fields.row_for(kind, path)
            if row.subtree and row.refuse_when is not None:
                continue  # defaulted inside a block that is refused whenever a user writes it
            spec = _with({}, path.removeprefix("spec."), value)
            assert fields.refusals(kind, spec, "ns/x") == (), (kind, path, value)


def test_llmkubes_own_samples_set_nothing_the_agent_refuses(llmkube_crds):
    """LLMKube's samples set pod fields routinely (image, resources, endpoint, gpu vendor): those are
    not applicable on a Mac, and must not be refused."""
    from tests.support.llmkube import samples_from_tarball

    for name, doc in samples_from_tarball(find_tarball()):
        if doc.get("kind") == ISVC and doc["spec"].get("runtime", "llamacpp") != "llamacpp":
            continue  # another runtime's service: never ours
        if doc.get("kind") in KINDS and isinstance(doc.get("spec"), dict):
            assert fields.refusals(doc["kind"], doc["spec"], name) == (), name
