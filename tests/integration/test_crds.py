"""Our CRDs accept what LLMKube users write and reject what the agent could not run."""

from __future__ import annotations

import copy

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.support.kube import apply, load_documents

pytestmark = pytest.mark.integration

GROUP, VERSION = "inference.llmkube.dev", "v1alpha1"

ISVC = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "InferenceService",
    "metadata": {"name": "bad"},
    "spec": {"modelRef": "m"},
}


def _assert_contains(got, want, path: str) -> None:
    """Everything written is stored; the schema's defaults (LLMKube's, e.g.
    gpu.vendor) may add fields."""
    if isinstance(want, dict):
        for key, value in want.items():
            assert key in got, f"{path}.{key} was pruned"
            _assert_contains(got[key], value, f"{path}.{key}")
    else:
        assert got == want, path


async def test_llmkube_format_manifest_applies_and_reads_back(admin_api, namespace, repo_root):
    docs = load_documents([repo_root / "manifests" / "samples" / "llmkube-format.yaml"])
    await apply(admin_api, docs, namespace=namespace)
    custom = client.CustomObjectsApi(admin_api)
    for doc in docs:
        plural = {"Model": "models", "InferenceService": "inferenceservices"}[doc["kind"]]
        stored = await custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, doc["metadata"]["name"])
        _assert_contains(stored["spec"], doc["spec"], "spec")  # fields the agent ignores survive too
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    stored = await custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "inferenceservices", isvc["metadata"]["name"])
    assert stored["spec"]["priority"] == "normal"  # schema default applied


@pytest.mark.parametrize(
    "field,value",
    [
        ("cacheTypeK", "turbo3"),
        ("contextSize", 64),
        ("cacheTypeCustomK", "turbo 3"),
        ("cacheTypeCustomV", "$(reboot)"),
        ("replicas", 11),
        ("parallelSlots", 0),
        ("priority", "urgent"),
        ("mode", "completion"),
        ("batchSize", 16385),
    ],
)
async def test_invalid_isvc_is_rejected_naming_the_field(admin_api, namespace, field, value):
    body = copy.deepcopy(ISVC)
    body["spec"][field] = value
    with pytest.raises(ApiException) as err:
        await client.CustomObjectsApi(admin_api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "inferenceservices", body
        )
    assert err.value.status == 422
    assert f"spec.{field}" in err.value.body


@pytest.mark.parametrize(
    "hardware,field",
    [
        ({"accelerator": "tpu"}, "spec.hardware.accelerator"),
        ({"gpu": {"count": 9}}, "spec.hardware.gpu.count"),
        ({"memoryFraction": 1.5}, "spec.hardware.memoryFraction"),
    ],
)
async def test_invalid_model_is_rejected_naming_the_field(admin_api, namespace, hardware, field):
    body = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Model", "metadata": {"name": "bad"},
        "spec": {"source": "https://example.invalid/m.gguf", "hardware": hardware},
    }
    with pytest.raises(ApiException) as err:
        await client.CustomObjectsApi(admin_api).create_namespaced_custom_object(GROUP, VERSION, namespace, "models", body)
    assert err.value.status == 422
    assert field in err.value.body
