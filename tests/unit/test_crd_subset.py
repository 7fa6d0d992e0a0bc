"""Our CRDs are a faithful subset of LLMKube's, for the pinned LLMKube version.

Why: a manifest that our CRDs accept must also be accepted by LLMKube's, and
mean the same thing there, because a cluster may run either set (ours when
only metal-agent is installed, LLMKube's when its operator is). Any field our
CRDs accept that LLMKube's reject is a manifest that works in one cluster and
fails, or is silently pruned, in the other; any status field our CRDs keep and
LLMKube's prune is a field the agent sees vanish and rewrites forever.

The check walks our schema and, at every node, compares it with LLMKube's
node at the same path: the node must exist, have the same type, an enum and
bounds within LLMKube's, the same pattern, defaults and server-side-apply
list/map semantics, and every `required` entry and CEL rule of LLMKube's.
The one leniency is `x-kubernetes-preserve-unknown-fields` on our side where
LLMKube has a typed schema: allowed only for a field metal-agent does not
read, and only when our CRD says so in that node's description (see the
CRD headers for why such fields are passed through instead of re-validated).

It reads LLMKube's CRDs straight from the vendored source tarball, so it
needs no build; without `../shared` (a user's clone) it skips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.llmkube import crds_from_tarball, find_tarball

REPO = Path(__file__).resolve().parents[2]
OURS = sorted((REPO / "manifests" / "crds").glob("*.yaml"))

#: Text our CRD must carry in the description of every node where it keeps
#: unknown fields and LLMKube's CRD does not (or of the array holding it).
PASS_THROUGH_MARKER = "metal-agent does not read"

PUF = "x-kubernetes-preserve-unknown-fields"
#: Keys that change how server-side apply merges a field; they must match or
#: two writers of the same object merge it differently depending on the CRDs.
SSA_KEYS = ("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type")
#: (key, our value must be ... LLMKube's): bounds ours may tighten, never loosen.
#: LLMKube CEL rules that cannot fail on an object our CRD admits, by path,
#: with the field whose absence from our schema makes them hold. The gpu rule
#: forbids setting both resourceName and resourceClaims; our CRD does not
#: declare resourceClaims (claims for GPU devices on cluster nodes; a Mac has
#: none), so it can never be set.
MOOT_RULES = {
    "Model.spec.hardware.gpu": {
        "!(has(self.resourceName) && has(self.resourceClaims) && self.resourceClaims.size() > 0)": "resourceClaims",
    },
}
LOWER_BOUNDS = ("minimum", "minLength", "minItems", "minProperties")
UPPER_BOUNDS = ("maximum", "maxLength", "maxItems", "maxProperties")


def _schema_problems(ours: dict, theirs: dict | None, path: str, *, required_by_parent: bool = False,
                     inherited_doc: str = "") -> list[str]:
    """Every way `ours` accepts or means more than `theirs` at `path`."""
    if theirs is None:
        return [f"{path}: not in LLMKube's CRD (LLMKube would reject or prune it)"]
    problems: list[str] = []

    def problem(text: str) -> None:
        problems.append(f"{path}: {text}")

    doc = f"{inherited_doc} {ours.get('description', '')}"
    if ours.get(PUF) and not theirs.get(PUF) and PASS_THROUGH_MARKER not in doc:
        problem(f"keeps unknown fields where LLMKube's does not, without saying '{PASS_THROUGH_MARKER}'")
    if ours.get("type") != theirs.get("type"):
        problem(f"type {ours.get('type')!r}, LLMKube's {theirs.get('type')!r}")
    for key in ("x-kubernetes-int-or-string", "x-kubernetes-embedded-resource", "nullable"):
        if bool(ours.get(key)) and not theirs.get(key):
            problem(f"{key} set, not in LLMKube's")
    if "format" in theirs and ours.get("format") != theirs["format"]:
        if not (ours.get("format") == "int32" and theirs["format"] == "int64"):
            problem(f"format {ours.get('format')!r}, LLMKube's {theirs['format']!r}")
    if "enum" in theirs:
        extra = set(ours.get("enum", ["<any value>"])) - set(theirs["enum"])
        if extra:
            problem(f"accepts {sorted(map(str, extra))} outside LLMKube's enum {theirs['enum']}")
    if "pattern" in theirs and ours.get("pattern") != theirs["pattern"]:
        problem(f"pattern {ours.get('pattern')!r}, LLMKube's {theirs['pattern']!r}")
    for key in LOWER_BOUNDS:
        if key in theirs:
            if key not in ours or ours[key] < theirs[key]:
                problem(f"{key} {ours.get(key)!r} is looser than LLMKube's {theirs[key]!r}")
            elif key == "minimum" and ours[key] == theirs[key] and theirs.get("exclusiveMinimum") and not ours.get("exclusiveMinimum"):
                problem("minimum is inclusive, LLMKube's is exclusive")
    for key in UPPER_BOUNDS:
        if key in theirs:
            if key not in ours or ours[key] > theirs[key]:
                problem(f"{key} {ours.get(key)!r} is looser than LLMKube's {theirs[key]!r}")
            elif key == "maximum" and ours[key] == theirs[key] and theirs.get("exclusiveMaximum") and not ours.get("exclusiveMaximum"):
                problem("maximum is inclusive, LLMKube's is exclusive")
    # Defaults decide what the stored object looks like; they must agree
    # (a default is moot on a field our schema requires).
    if "default" in ours and ours["default"] != theirs.get("default"):
        problem(f"default {ours['default']!r}, LLMKube's {theirs.get('default')!r}")
    if "default" in theirs and "default" not in ours and not required_by_parent:
        problem(f"no default; LLMKube defaults it to {theirs['default']!r}")
    for key in SSA_KEYS:
        if ours.get(key) != theirs.get(key):
            problem(f"{key} {ours.get(key)!r}, LLMKube's {theirs.get(key)!r}")
    for combinator in ("allOf", "anyOf", "oneOf", "not"):
        if combinator in theirs and ours.get(combinator) != theirs[combinator]:
            problem(f"{combinator} differs from LLMKube's")
    our_rules = {r["rule"] for r in ours.get("x-kubernetes-validations", [])}
    for rule in theirs.get("x-kubernetes-validations", []):
        if rule["rule"] in our_rules or ours.get(PUF):
            continue
        holds_without = MOOT_RULES.get(path, {}).get(rule["rule"])
        if holds_without and holds_without not in ours.get("properties", {}):
            continue
        problem(f"lacks LLMKube's validation rule {rule['rule']!r}")

    missing_required = set(theirs.get("required", [])) - set(ours.get("required", []))
    if missing_required and not ours.get(PUF):
        problem(f"does not require {sorted(missing_required)}, LLMKube's does")

    our_required = set(ours.get("required", []))
    their_props = theirs.get("properties", {})
    for name, child in ours.get("properties", {}).items():
        child_theirs = their_props.get(name)
        if child_theirs is None and isinstance(theirs.get("additionalProperties"), dict):
            child_theirs = theirs["additionalProperties"]
        problems += _schema_problems(child, child_theirs, f"{path}.{name}", required_by_parent=name in our_required)
    if "additionalProperties" in ours:
        if not isinstance(theirs.get("additionalProperties"), dict):
            problem("accepts arbitrary keys (additionalProperties); LLMKube's does not")
        elif isinstance(ours["additionalProperties"], dict):
            problems += _schema_problems(ours["additionalProperties"], theirs["additionalProperties"], f"{path}.*")
    if "items" in ours:
        problems += _schema_problems(ours["items"], theirs.get("items"), f"{path}[]",
                                     inherited_doc=ours.get("description", ""))
    return problems


def _crd_problems(ours: dict, theirs: dict) -> list[str]:
    """Names, scope, versions and subresources; then each served version's schema."""
    problems: list[str] = []
    spec, their_spec = ours["spec"], theirs["spec"]
    name = ours["metadata"]["name"]
    if spec["group"] != their_spec["group"] or spec["scope"] != their_spec["scope"]:
        problems.append(f"{name}: group/scope differ")
    for key in ("kind", "listKind", "plural", "singular"):
        if spec["names"].get(key) != their_spec["names"].get(key):
            problems.append(f"{name}: names.{key} {spec['names'].get(key)!r}, LLMKube's {their_spec['names'].get(key)!r}")
    extra_short = set(spec["names"].get("shortNames", [])) - set(their_spec["names"].get("shortNames", []))
    if extra_short:
        problems.append(f"{name}: short names {sorted(extra_short)} are not LLMKube's")
    their_versions = {v["name"]: v for v in their_spec["versions"]}
    for version in spec["versions"]:
        theirs_v = their_versions.get(version["name"])
        if theirs_v is None:
            problems.append(f"{name}: version {version['name']} is not LLMKube's")
            continue
        if version.get("storage") != theirs_v.get("storage") or version.get("served") != theirs_v.get("served"):
            problems.append(f"{name}/{version['name']}: served/storage differ")
        for sub, value in (version.get("subresources") or {}).items():
            if (theirs_v.get("subresources") or {}).get(sub) != value:
                problems.append(f"{name}/{version['name']}: subresource {sub} {value!r} is not LLMKube's")
        problems += _schema_problems(
            version["schema"]["openAPIV3Schema"], theirs_v["schema"]["openAPIV3Schema"], f"{spec['names']['kind']}"
        )
    return problems


@pytest.fixture(scope="module")
def llmkube_crds() -> dict[str, dict]:
    tarball = find_tarball()
    if tarball is None:
        pytest.skip("no LLMKube source tarball (../shared/vendor/llmkube-*.tar.gz): only developers and CI have it")
    return {crd["metadata"]["name"]: crd for crd in crds_from_tarball(tarball)}


@pytest.mark.parametrize("path", OURS, ids=[p.name for p in OURS])
def test_our_crd_is_a_faithful_subset_of_llmkubes(path: Path, llmkube_crds):
    ours = yaml.safe_load(path.read_text())
    theirs = llmkube_crds.get(ours["metadata"]["name"])
    assert theirs is not None, f"LLMKube has no CRD named {ours['metadata']['name']}"
    problems = _crd_problems(ours, theirs)
    assert not problems, "our CRD accepts or means what LLMKube's does not:\n" + "\n".join(problems)


def test_status_has_no_fields_llmkube_prunes(llmkube_crds):
    """Named explicitly because it is the costly one: a status field LLMKube's
    CRD prunes is rewritten by the agent on every event, forever (issue 11)."""
    for path in OURS:
        ours = yaml.safe_load(path.read_text())
        status = ours["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert not status.get(PUF), f"{path.name}: status keeps unknown fields"
        for gone in ("specHash", "observedGeneration"):
            assert gone not in status.get("properties", {}), f"{path.name}: status.{gone}"


# The checker itself, on small schemas: each rule catches what it is for.

def _node(**kw) -> dict:
    return {"type": "object", **kw}


@pytest.mark.parametrize(
    "ours,theirs,expected",
    [
        (_node(properties={"x": {"type": "string"}}), _node(properties={}), "not in LLMKube's CRD"),
        ({"type": "integer"}, {"type": "string"}, "type 'integer'"),
        ({"type": "string", "enum": ["a", "b"]}, {"type": "string", "enum": ["a"]}, "outside LLMKube's enum"),
        ({"type": "string"}, {"type": "string", "enum": ["a"]}, "outside LLMKube's enum"),
        ({"type": "integer", "minimum": 0}, {"type": "integer", "minimum": 1}, "minimum 0 is looser"),
        ({"type": "integer"}, {"type": "integer", "maximum": 8}, "maximum None is looser"),
        ({"type": "string", "pattern": "^a"}, {"type": "string", "pattern": "^b"}, "pattern"),
        ({"type": "boolean"}, {"type": "boolean", "default": False}, "no default"),
        (_node(**{PUF: True}), _node(properties={}), "keeps unknown fields"),
        (_node(), _node(required=["a"]), "does not require ['a']"),
        ({"type": "array", "items": {"type": "string"}}, {"type": "array", "items": {"type": "string"},
         "x-kubernetes-list-type": "set"}, "x-kubernetes-list-type"),
        (_node(), _node(**{"x-kubernetes-validations": [{"rule": "self.a"}]}), "lacks LLMKube's validation rule"),
    ],
)
def test_checker_catches(ours, theirs, expected):
    problems = _schema_problems(ours, theirs, "X")
    assert any(expected in p for p in problems), problems


def test_checker_accepts_tighter_and_documented_pass_through():
    ours = _node(required=["a"], properties={
        "a": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 4},
        "b": {"type": "object", PUF: True, "description": f"LLMKube's; {PASS_THROUGH_MARKER} it."},
        "c": {"type": "array", "description": f"{PASS_THROUGH_MARKER} it", "items": {"type": "object", PUF: True}},
        "d": {"type": "string", "pattern": "^[a-z]+$"},
    })
    theirs = _node(properties={
        "a": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 8, "default": 2},
        "b": _node(properties={"x": {"type": "string"}}, required=["x"]),
        "c": {"type": "array", "items": _node(properties={})},
        "d": {"type": "string"},
    })
    assert _schema_problems(ours, theirs, "X") == []
