"""The agent's permission table and the ClusterRole in manifests/rbac/metal-agent.yaml say the same thing.

The table (metal_agent/core/permissions.py) is what the doctor checks; the
role is what an install grants. Both directions are checked: a permission
the agent uses but the role lacks breaks the agent (403s), and a grant the
agent never uses is privilege nobody needs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from metal_agent.core.permissions import AGENT_PERMISSIONS, FLEET_NAMESPACE, FLEET_PERMISSIONS

RBAC = Path(__file__).resolve().parents[2] / "manifests" / "rbac" / "metal-agent.yaml"

#: Granted by the role but used by no code: none, and the test below keeps it so
#: (it fails if the role and this set disagree in either direction).
GRANTED_BUT_UNUSED: set[tuple[str, str, str]] = set()


def role_grants() -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) for every combination the ClusterRole's rules grant."""
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in roles] == ["metal-agent"]
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "metal-agent"}
    grants = set()
    for rule in roles[0]["rules"]:
        # resourceNames or nonResourceURLs would need modelling here; the agent's role has none.
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for field in rule.values():
            assert "*" not in field, f"wildcard in {rule}: grants more than any table can list"
        grants |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return grants


def table() -> set[tuple[str, str, str]]:
    return {(p.group, p.rbac_resource, p.verb) for p in AGENT_PERMISSIONS}


def test_table_rows_are_unique_and_explained():
    assert len(table()) == len(AGENT_PERMISSIONS)
    for perm in AGENT_PERMISSIONS:
        assert perm.why, f"{perm} does not say why the agent needs it"


def test_role_grants_every_permission_the_agent_uses():
    missing = table() - role_grants()
    assert not missing, f"manifests/rbac/metal-agent.yaml lacks {sorted(missing)}"


def test_role_grants_nothing_the_agent_does_not_use():
    extra = role_grants() - table()
    assert extra == GRANTED_BUT_UNUSED, (
        f"granted but not in metal_agent/core/permissions.py: {sorted(extra - GRANTED_BUT_UNUSED)}; "
        f"no longer granted, drop from GRANTED_BUT_UNUSED: {sorted(GRANTED_BUT_UNUSED - extra)}"
    )


def test_secrets_are_never_in_the_table():
    """Reading a download token is a separate, per-Secret, opt-in grant (optional-model-secret-reader.yaml)."""
    assert not any(p.resource == "secrets" for p in AGENT_PERMISSIONS)
    assert not any(resource == "secrets" for _, resource, _ in role_grants())


def test_fleet_role_grants_exactly_the_fleet_table_in_the_fleet_namespace_only():
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "metal-agent-fleet"]
    assert [r["metadata"]["namespace"] for r in roles] == [FLEET_NAMESPACE]
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "metal-agent-fleet")
    assert binding["metadata"]["namespace"] == FLEET_NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "metal-agent-fleet"}
    grants = {(g, r, v) for rule in roles[0]["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    assert grants == {(p.group, p.rbac_resource, p.verb) for p in FLEET_PERMISSIONS}
    assert not any(resource == "leases" for _, resource, _ in role_grants())  # nothing cluster-wide
