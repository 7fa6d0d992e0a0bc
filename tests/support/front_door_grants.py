"""The shipped front-door RBAC manifests, applied as a Mac's owner would, for access tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.support.kube import apply

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


async def grant_key_reader(admin_api, namespace: str, secrets: list[str]) -> None:
    """The shipped optional-api-key-reader.yaml, for `namespace` and `secrets`."""
    docs = _docs(MANIFESTS / "rbac" / "optional-api-key-reader.yaml")
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "Role":
            doc["rules"][0]["resourceNames"] = secrets
    await apply(admin_api, docs)


async def grant_client(admin_api, namespace: str, service: str) -> None:
    """The shipped sample client Role and its binding (ServiceAccount chat-client), for `service`."""
    docs = _docs(MANIFESTS / "samples" / "front-door-client.yaml")
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] == "Role":
            doc["rules"][0]["resourceNames"] = [service]
        if doc["kind"] == "RoleBinding":
            doc["subjects"][0]["namespace"] = namespace
    await apply(admin_api, docs)
