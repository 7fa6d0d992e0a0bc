"""The LLMKube harness runs LLMKube's real manager, and it behaves as the contract says.

These are the facts the coexistence tests stand on, checked against the
pinned LLMKube manager rather than assumed: its Model controller accepts a
Metal `file://` source only under `--allowed-host-path-roots` (and refuses
others with a reason we can quote to users), an InferenceService waits until
its Model is Ready, the controller writes InferenceService status with a
field manager of its own, and our agent's least-privilege role works against
LLMKube's CRDs. Everything skips without `../shared` (no LLMKube source).
"""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.support.isvc import MERGE_PATCH
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION = "inference.llmkube.dev", "v1alpha1"
#: What LLMKube's manager calls itself in managedFields: controller-runtime
#: derives the field manager from the binary's name (`manager`).
LLMKUBE_FIELD_MANAGER = "manager"


def _model(name: str, source: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Model", "metadata": {"name": name},
        "spec": {"source": source, "format": "gguf", "hardware": {"accelerator": "metal"}},
    }


def _isvc(name: str, model: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"modelRef": model}}


async def _status(api, namespace: str, plural: str, name: str) -> dict:
    obj = await client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    return obj.get("status") or {}


def _condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), None)


async def test_manager_is_ready_and_serves_metrics(llmkube_plane):
    text = await llmkube_plane.metrics_text()
    # controller-runtime's own series, per controller: the manager really runs its reconcilers.
    assert 'controller_runtime_reconcile_total{controller="model"' in text
    assert 'controller_runtime_reconcile_total{controller="inferenceservice"' in text


async def test_metal_file_model_under_the_allowed_root_is_ready(llmkube_plane, llmkube_admin_api, llmkube_namespace,
                                                               llmkube_tiny_model):
    """LLMKube marks a Metal model with a local source Ready without copying it
    (reason MetalAgentManaged: the host agent loads it), if the path is allowed."""
    custom = client.CustomObjectsApi(llmkube_admin_api)
    await custom.create_namespaced_custom_object(
        GROUP, VERSION, llmkube_namespace, "models", _model("tiny", f"file://{llmkube_tiny_model}"))

    async def ready() -> dict | None:
        status = await _status(llmkube_admin_api, llmkube_namespace, "models", "tiny")
        return status if status.get("phase") == "Ready" else None

    status = await wait_for(ready, timeout=60, what="LLMKube to mark the Model Ready", on_timeout=llmkube_plane.manager_tail)
    available = _condition(status, "Available")
    assert available and available["status"] == "True" and available["reason"] == "MetalAgentManaged", status


async def test_file_model_outside_the_allowed_roots_is_refused_and_its_service_waits(
        llmkube_plane, llmkube_admin_api, llmkube_namespace, tiny_model):
    """`tiny_model` lives in the asset cache, outside the manager's allowed root:
    LLMKube fails the Model with Degraded/SourceNotAllowed, and an
    InferenceService using it stays Pending (Progressing/Pending, "Waiting for
    Model to be Ready"), which is all a user sees unless the agent explains it
    (issue 11, item 8)."""
    assert llmkube_plane.models_root not in tiny_model.parents
    custom = client.CustomObjectsApi(llmkube_admin_api)
    await custom.create_namespaced_custom_object(
        GROUP, VERSION, llmkube_namespace, "models", _model("outside", f"file://{tiny_model}"))
    await custom.create_namespaced_custom_object(
        GROUP, VERSION, llmkube_namespace, "inferenceservices", _isvc("outside", "outside"))

    async def refused() -> dict | None:
        status = await _status(llmkube_admin_api, llmkube_namespace, "models", "outside")
        return status if status.get("phase") == "Failed" else None

    status = await wait_for(refused, timeout=60, what="LLMKube to refuse the Model", on_timeout=llmkube_plane.manager_tail)
    degraded = _condition(status, "Degraded")
    assert degraded and degraded["status"] == "True" and degraded["reason"] == "SourceNotAllowed", status
    assert "not within any allowed root" in degraded["message"] and str(llmkube_plane.models_root) in degraded["message"]

    async def waiting() -> dict | None:
        status = await _status(llmkube_admin_api, llmkube_namespace, "inferenceservices", "outside")
        return status if status.get("phase") == "Pending" else None

    isvc = await wait_for(waiting, timeout=60, what="the service to wait for its Model", on_timeout=llmkube_plane.manager_tail)
    progressing = _condition(isvc, "Progressing")
    assert progressing and progressing["status"] == "True" and progressing["reason"] == "Pending", isvc
    assert progressing["message"] == "Waiting for Model to be Ready"


async def test_controller_writes_service_status_as_its_own_field_manager(
        llmkube_plane, llmkube_admin_api, llmkube_namespace, llmkube_tiny_model):
    """With the Model Ready and no agent, LLMKube waits for a Metal agent
    (schedulingStatus WaitingForMetalAgent) and records the write in
    managedFields under its own manager, on the status subresource: how the
    agent can tell that LLMKube's controller manages a cluster."""
    custom = client.CustomObjectsApi(llmkube_admin_api)
    await custom.create_namespaced_custom_object(
        GROUP, VERSION, llmkube_namespace, "models", _model("tiny", f"file://{llmkube_tiny_model}"))
    await custom.create_namespaced_custom_object(
        GROUP, VERSION, llmkube_namespace, "inferenceservices", _isvc("chat", "tiny"))

    async def waiting_for_agent() -> dict | None:
        obj = await custom.get_namespaced_custom_object(GROUP, VERSION, llmkube_namespace, "inferenceservices", "chat")
        return obj if (obj.get("status") or {}).get("schedulingStatus") == "WaitingForMetalAgent" else None

    obj = await wait_for(waiting_for_agent, timeout=60, what="LLMKube to wait for a Metal agent",
                         on_timeout=llmkube_plane.manager_tail)
    assert obj["status"]["phase"] == "Creating"
    status_writers = {e["manager"] for e in obj["metadata"]["managedFields"] if e.get("subresource") == "status"}
    assert status_writers == {LLMKUBE_FIELD_MANAGER}, json.dumps(obj["metadata"]["managedFields"], indent=1)


async def test_agent_role_works_on_llmkubes_crds(llmkube_admin_api, llmkube_agent_api, llmkube_namespace):
    """manifests/rbac/metal-agent.yaml names LLMKube's group and resources: the
    agent can list Models and InferenceServices and patch only the status."""
    admin = client.CustomObjectsApi(llmkube_admin_api)
    agent = client.CustomObjectsApi(llmkube_agent_api)
    await admin.create_namespaced_custom_object(
        GROUP, VERSION, llmkube_namespace, "models", _model("m", "hf://org/repo/m.gguf"))
    await admin.create_namespaced_custom_object(GROUP, VERSION, llmkube_namespace, "inferenceservices", _isvc("s", "m"))

    assert [m["metadata"]["name"] for m in (await agent.list_namespaced_custom_object(
        GROUP, VERSION, llmkube_namespace, "models"))["items"]] == ["m"]
    await agent.list_cluster_custom_object(GROUP, VERSION, "inferenceservices")
    await agent.patch_namespaced_custom_object_status(
        GROUP, VERSION, llmkube_namespace, "inferenceservices", "s",
        {"status": {"schedulingMessage": "written by the agent identity"}}, _content_type=MERGE_PATCH)

    for forbidden in (
        lambda: agent.patch_namespaced_custom_object(GROUP, VERSION, llmkube_namespace, "inferenceservices", "s",
                                                     {"spec": {"replicas": 0}}, _content_type=MERGE_PATCH),
        lambda: agent.create_namespaced_custom_object(GROUP, VERSION, llmkube_namespace, "models",
                                                      _model("x", "hf://o/r/x.gguf")),
        lambda: agent.patch_namespaced_custom_object_status(GROUP, VERSION, llmkube_namespace, "models", "m",
                                                            {"status": {"phase": "Ready"}},
                                                            _content_type=MERGE_PATCH),
    ):
        with pytest.raises(ApiException) as err:
            await forbidden()
        assert err.value.status == 403
