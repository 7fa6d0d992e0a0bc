"""Raw LLMKube objects, shaped like the API server returns them, for core tests.

Each builder returns a fresh plain dict (as from JSON) of a *valid* Metal
workload; tests change one field at a time to isolate what they check.
"""

from __future__ import annotations

from typing import Any

from metal_agent.core.claim import evaluate
from metal_agent.core.workload import Workload
from metal_agent.core.result import Parsed
from metal_agent.core.spec_policy import SpecPolicy

GROUP_VERSION = "inference.llmkube.dev/v1alpha1"
SOURCE = "https://example.com/models/tiny-llama.gguf"


def model_doc(name: str = "tiny", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"source": SOURCE, "hardware": {"accelerator": "metal"}}
    body.update(spec)
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "Model",
        "metadata": {"name": name, "namespace": namespace, "uid": "m-uid", "generation": 1},
        "spec": body,
    }


def isvc_doc(
    name: str = "chat", namespace: str = "default", model_ref: str = "tiny", **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"modelRef": model_ref}
    body.update(spec)
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "i-uid",
            "generation": 3,
            "resourceVersion": "4711",
        },
        "spec": body,
    }


def gpu(**fields: Any) -> dict[str, Any]:
    """`spec.hardware` of a Metal model with the given `gpu` fields."""
    return {"accelerator": "metal", "gpu": fields}


def workload(isvc_spec: dict[str, Any] | None = None, *, policy: SpecPolicy | None = None,
             **model_spec: Any) -> Workload:
    """A validated workload (under the owner's `policy`, default none); fails the test if the input is not valid."""
    outcome = evaluate(isvc_doc(**(isvc_spec or {})), model_doc(**model_spec), policy=policy or SpecPolicy())
    assert isinstance(outcome, Parsed), outcome
    return outcome.value
