"""The agent identity can do its job and nothing more, judged by the real RBAC authorizer.

Each check is made twice: a SubjectAccessReview answered by the API server's
authorizer, and, where it is cheap, the real request made with the agent's
own credentials, so a mismatch between what we think the role grants and what
the server enforces cannot hide.
"""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.permissions import AGENT_PERMISSIONS, FLEET_NAMESPACE, FLEET_PERMISSIONS
from tests.support.controlplane import AGENT_USER

pytestmark = pytest.mark.integration

GROUP, VERSION = "inference.llmkube.dev", "v1alpha1"

#: Everything the agent does: the same table the doctor checks and the unit
#: test holds the manifest to, here answered by the real authorizer.
ALLOWED = [(p.group, p.resource, p.subresource, p.verb) for p in AGENT_PERMISSIONS]

DENIED = [
    ("", "secrets", "", "get"),
    ("", "secrets", "", "list"),
    ("", "pods", "", "create"),
    ("", "pods", "", "list"),
    (GROUP, "inferenceservices", "", "update"),
    (GROUP, "inferenceservices", "", "delete"),
    (GROUP, "models", "", "patch"),
    ("", "endpoints", "", "create"),
    ("", "namespaces", "", "create"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "", "create"),
    ("coordination.k8s.io", "leases", "", "create"),
    ("", "services", "", "watch"),
    (GROUP, "inferenceservices", "status", "update"),
]


async def _allowed(admin_api, group, resource, sub, verb, namespace) -> bool:
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=AGENT_USER,
            resource_attributes=client.V1ResourceAttributes(
                group=group, resource=resource, subresource=sub or None, verb=verb, namespace=namespace
            ),
        )
    )
    result = await client.AuthorizationV1Api(admin_api).create_subject_access_review(review)
    return bool(result.status.allowed)


@pytest.mark.parametrize("group,resource,sub,verb", ALLOWED, ids=lambda v: v or "-")
async def test_agent_is_allowed(admin_api, namespace, group, resource, sub, verb):
    assert await _allowed(admin_api, group, resource, sub, verb, namespace)


@pytest.mark.parametrize("group,resource,sub,verb", DENIED, ids=lambda v: v or "-")
async def test_agent_is_denied(admin_api, namespace, group, resource, sub, verb):
    assert not await _allowed(admin_api, group, resource, sub, verb, namespace)


async def test_agent_requests_are_enforced(admin_api, agent_api, namespace):
    """Real calls with the agent's certificate: reads and status writes pass, the rest is 403."""
    custom = client.CustomObjectsApi(agent_api)
    await custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceservices")
    await custom.list_cluster_custom_object(GROUP, VERSION, "models")

    await client.CustomObjectsApi(admin_api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "inferenceservices",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
         "metadata": {"name": "rbac-probe"}, "spec": {"modelRef": "m"}},
    )
    patched = await custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "inferenceservices", "rbac-probe",
        {"status": {"phase": "Pending"}}, _content_type="application/merge-patch+json",
    )
    assert patched["status"]["phase"] == "Pending"

    core = client.CoreV1Api(agent_api)
    with pytest.raises(ApiException) as secret_read:
        await core.list_namespaced_secret(namespace)
    assert secret_read.value.status == 403
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="nope"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
    )
    with pytest.raises(ApiException) as pod_create:
        await core.create_namespaced_pod(namespace, pod)
    assert pod_create.value.status == 403
    with pytest.raises(ApiException) as spec_edit:
        await custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferenceservices", "rbac-probe", {"spec": {"replicas": 0}},
            _content_type="application/merge-patch+json",
        )
    assert spec_edit.value.status == 403


#: Fleet mode's Leases: granted in the fleet namespace only (the Role metal-agent-fleet).
FLEET_ALLOWED = [(p.group, p.resource, p.verb) for p in FLEET_PERMISSIONS]


@pytest.mark.parametrize("group,resource,verb", FLEET_ALLOWED)
async def test_fleet_leases_are_allowed_in_the_fleet_namespace_only(admin_api, namespace, group, resource, verb):
    assert await _allowed(admin_api, group, resource, "", verb, FLEET_NAMESPACE)
    for elsewhere in (namespace, "kube-node-lease", "kube-system", None):  # None: cluster-wide
        assert not await _allowed(admin_api, group, resource, "", verb, elsewhere), elsewhere
