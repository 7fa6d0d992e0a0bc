"""The download-token reader against a real API server with RBAC on.

The agent identity has no access to Secrets until the optional, per-name
grant (manifests/rbac/optional-model-secret-reader.yaml) is applied; the
reader must then get exactly the granted Secret, and explain every refusal
without ever showing the token.
"""

from __future__ import annotations

import base64

import pytest
from kubernetes_asyncio import client
from structlog.testing import capture_logs

from metal_agent.adapters.downloads import TokenUnavailable
from metal_agent.core.api import SecretRef
from metal_agent.adapters.kube.secrets import RBAC_HINT, SecretTokenReader
from tests.support.kube import apply, load_documents
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

TOKEN = "hf_RbacGatedToken42"


async def _secret(admin_api, namespace: str, name: str, data: dict[str, str]) -> None:
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name),
                           data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
    await client.CoreV1Api(admin_api).create_namespaced_secret(namespace, body)


async def _reason(read, namespace: str, ref: SecretRef) -> str:
    with pytest.raises(TokenUnavailable) as caught:
        await read(namespace, ref)
    return caught.value.blocker


async def test_reader_needs_the_grant_and_reads_only_granted_secrets(admin_api, agent_api, namespace, repo_root):
    await _secret(admin_api, namespace, "hf-token", {"token": TOKEN + "\n", "other": "x"})
    await _secret(admin_api, namespace, "not-granted", {"token": "nope"})
    read = SecretTokenReader(agent_api)

    with capture_logs() as logs:
        before = await _reason(read, namespace, SecretRef("hf-token"))
        assert before.reason == "ModelSecretForbidden"
        assert f"Secret {namespace}/hf-token" in before.message and RBAC_HINT in before.message

        docs = load_documents([repo_root / "manifests" / "rbac" / "optional-model-secret-reader.yaml"])
        for doc in docs:
            doc["metadata"]["namespace"] = namespace
            for rule in doc.get("rules", []):
                rule["resourceNames"] = ["hf-token", "missing-token"]
        await apply(admin_api, docs)

        async def granted() -> str | None:
            try:
                return await read(namespace, SecretRef("hf-token"))
            except TokenUnavailable:
                return None

        assert await wait_for(granted, timeout=30, what="the grant to take effect") == TOKEN

        assert (await _reason(read, namespace, SecretRef("not-granted"))).reason == "ModelSecretForbidden"
        assert (await _reason(read, namespace, SecretRef("missing-token"))).reason == "ModelSecretNotFound"
        wrong_key = await _reason(read, namespace, SecretRef("hf-token", "hf"))
        assert wrong_key.reason == "ModelSecretInvalid" and "'hf'" in wrong_key.message

    assert TOKEN not in repr(logs)
    for blocker in (before, wrong_key):
        assert TOKEN not in blocker.message
