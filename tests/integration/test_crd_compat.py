"""Every sample we ship applies, with strict field validation, to LLMKube's CRDs and to ours.

Why strict: `kubectl apply` validates strictly by default, so a field one CRD
set declares and the other does not is an error for the user, not a silent
difference. Our samples must work on a cluster that runs LLMKube (its CRDs,
its controller) as well as on one with only metal-agent's CRDs; and since our
CRDs declare LLMKube's fields, LLMKube's own Model and InferenceService
samples must apply to ours too. tests/unit/test_crd_subset.py checks the
schemas; this checks the real API servers agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.support.llmkube import find_tarball, samples_from_tarball

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "inference.llmkube.dev", "v1alpha1"
PLURALS = {"Model": "models", "InferenceService": "inferenceservices"}


def _docs(files) -> list[tuple[str, dict]]:
    docs = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in PLURALS:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


OUR_SAMPLES = _docs(sorted((REPO / "manifests" / "samples").glob("*.yaml")))


async def _create_strict(api, namespace: str, doc: dict) -> dict:
    body = dict(doc, metadata={k: v for k, v in doc["metadata"].items() if k != "namespace"})
    return await client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[doc["kind"]], body, field_validation="Strict"
    )


def _assert_kept(doc: dict, stored: dict) -> None:
    """Nothing the manifest says was dropped (defaults may add fields)."""
    def walk(want, got, path):
        if isinstance(want, dict):
            assert isinstance(got, dict), path
            for key, value in want.items():
                assert key in got, f"{path}.{key} was pruned"
                walk(value, got[key], f"{path}.{key}")
        else:
            assert got == want, path

    walk(doc["spec"], stored["spec"], "spec")


@pytest.mark.parametrize("doc", [d for _, d in OUR_SAMPLES], ids=[i for i, _ in OUR_SAMPLES])
async def test_our_samples_apply_strictly_to_llmkubes_crds(llmkube_admin_api, llmkube_namespace, doc):
    _assert_kept(doc, await _create_strict(llmkube_admin_api, llmkube_namespace, doc))


@pytest.mark.parametrize("doc", [d for _, d in OUR_SAMPLES], ids=[i for i, _ in OUR_SAMPLES])
async def test_our_samples_apply_strictly_to_our_crds(admin_api, namespace, doc):
    _assert_kept(doc, await _create_strict(admin_api, namespace, doc))


def _llmkube_samples() -> list[tuple[str, dict]]:
    """LLMKube's own Model and InferenceService samples (none without its source)."""
    tarball = find_tarball()
    if tarball is None:
        return []
    return [(f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for name, doc in samples_from_tarball(tarball) if doc.get("kind") in PLURALS]


LLMKUBE_SAMPLES = _llmkube_samples() or [("no-llmkube-source", None)]


@pytest.mark.parametrize("doc", [d for _, d in LLMKUBE_SAMPLES], ids=[i for i, _ in LLMKUBE_SAMPLES])
async def test_llmkubes_samples_apply_strictly_to_our_crds(admin_api, namespace, doc):
    if doc is None:
        pytest.skip("no LLMKube source (../shared/vendor/llmkube-*.tar.gz): only developers and CI have it")
    _assert_kept(doc, await _create_strict(admin_api, namespace, doc))


async def test_a_field_llmkube_lacks_is_refused_by_both(admin_api, namespace, llmkube_admin_api, llmkube_namespace):
    """The old llmkube-format sample's `spec.description`: LLMKube's CRD rejects
    it under strict validation, and now ours does too, instead of keeping it."""
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Model", "metadata": {"name": "described"},
           "spec": {"source": "hf://org/repo/m.gguf", "description": "not a Model field"}}
    for api, ns in ((llmkube_admin_api, llmkube_namespace), (admin_api, namespace)):
        with pytest.raises(ApiException) as err:
            await _create_strict(api, ns, doc)
        assert err.value.status == 400, err.value.body
        message = json.loads(err.value.body)["message"]
        assert 'strict decoding error: unknown field "spec.description"' in message, message
