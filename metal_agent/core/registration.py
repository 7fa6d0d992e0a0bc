"""The Service and EndpointSlice that make a Mac's llama-server reachable in the cluster.

LLMKube's controller and kubectl read these objects, so names, labels,
annotations and ports follow the wire contract to the letter. The Service
has no selector (nothing in the cluster runs the model); the EndpointSlice
points it at the Mac. Both are built here as plain dicts, applied by the
adapter with server-side apply, which updates them in place: the Service is
never deleted and re-created, so its ClusterIP survives every respawn.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MANAGED_BY_LABEL = "llmkube.ai/managed-by"
MANAGED_BY_VALUE = "metal-agent"
ISVC_LABEL = "llmkube.ai/inference-service"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SLICE_MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
HEARTBEAT_ANNOTATION = "llmkube.ai/agent-heartbeat"
VERSION_ANNOTATION = "llmkube.ai/agent-version"
SERVICE_PORT = 8080
PORT_NAME = "http"
FLEET_MEMBER_LABEL = "llmkube.ai/fleet-member"  # fleet mode: the Mac a slice belongs to
# The labels LLMKube puts on its inference pods (deployment_builder.go) and its
# PodMonitor promotes to `service`, `model` and `runtime`: on our Service and
# slices too, one selector finds GPU pods and Mac processes alike.
INFERENCE_SERVICE_LABEL = "inference.llmkube.dev/service"
INFERENCE_MODEL_LABEL = "inference.llmkube.dev/model"
INFERENCE_RUNTIME_LABEL = "inference.llmkube.dev/runtime"
# LLMKube's runtimeNameLabel() for llama.cpp (spec.runtime empty or `llamacpp`):
# the same engine gets the same value on a GPU pod and on a Mac. Another engine
# passes its own name in `Registration.runtime`.
RUNTIME_LLAMACPP = "llamacpp"
# Which Mac serves a slice: Prometheus relabels it to `host`, the label that
# joins a llama-server's tokens to its Mac's energy.
HOST_LABEL = "llmkube.ai/host"

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Registration:
    """Everything that decides the two objects' content (heartbeat aside)."""

    namespace: str
    isvc_name: str
    isvc_uid: str
    address: str
    port: int
    ready: bool
    member: str | None = None  # fleet mode: this Mac's member name; its slice is named for it
    model: str = ""  # spec.modelRef, for the `inference.llmkube.dev/model` label
    runtime: str = RUNTIME_LLAMACPP
    service_port: int = SERVICE_PORT  # spec.endpoint.port: the port clients dial on the Service


def service_name(isvc_name: str) -> str:
    """LLMKube's rule: the InferenceService name with dots replaced by dashes."""
    return isvc_name.replace(".", "-")


def service_name_problem(isvc_name: str) -> str | None:
    """Why the derived Service name is not a valid DNS-1035 label, if it is not."""
    name = service_name(isvc_name)
    if len(name) > 63:
        return f"Service name {name!r} is longer than 63 characters; shorten the InferenceService name"
    if not _DNS_1035.match(name):
        return f"Service name {name!r} must start with a letter (DNS-1035); rename the InferenceService"
    return None


def ours(labels: dict | None, owner_uids: list[str], isvc_name: str, isvc_uid: str) -> bool:
    """May the agent write over, or delete, an existing Service or slice of `isvc_name`'s name?

    Only what carries our managed-by label for this very InferenceService (we
    made it, or LLMKube's Go agent, which stamps the same labels), or what names
    this InferenceService's uid among its owners (whoever could write it handed
    it over: LLMKube's controller makes such a Service while the Model is not on
    Metal). Anything else is someone else's object that happens to have the
    name: a stranger's InferenceService must never take it over.
    """
    labels = labels or {}
    if labels.get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE and labels.get(ISVC_LABEL) == isvc_name:
        return True
    return bool(isvc_uid) and isvc_uid in owner_uids


SERVICE_NAME_CONFLICT = "ServiceNameConflict"


def conflict_message(kind: str, namespace: str, name: str) -> str:
    """What the InferenceService's status and Event say when its name is taken."""
    return (f"{kind} {namespace}/{name} already exists and is not metal-agent's (no {MANAGED_BY_LABEL}={MANAGED_BY_VALUE} "
            f"label for this InferenceService): it is left untouched and this service is not registered; "
            f"rename the InferenceService or remove that {kind}")


def slice_name(isvc_name: str, member: str | None = None) -> str:
    """One agent: `<service>-metal`. In a fleet each serving Mac has its own slice, `<service>-<member>`."""
    return f"{service_name(isvc_name)}-{member or 'metal'}"


def address_type(address: str) -> str:
    return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"


_MODE_PATHS = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings", "rerank": "/v1/rerank"}


def endpoint_path(raw_spec: dict | None, mode: str = "chat") -> str:
    """The path `status.endpoint` ends with: `spec.endpoint.path` when given (as LLMKube
    reads it), else the OpenAI-style path of the serving mode."""
    given = ((raw_spec or {}).get("endpoint") or {}).get("path") if isinstance(raw_spec, dict) else None
    return given if isinstance(given, str) and given.startswith("/") else _MODE_PATHS.get(mode, _MODE_PATHS["chat"])


def service_port(raw_spec: dict | None) -> int:
    """The Service's port: `spec.endpoint.port` (1-65535), as LLMKube's operator gives the
    Services it creates and writes into `status.endpoint`; 8080 when unset."""
    given = ((raw_spec or {}).get("endpoint") or {}).get("port") if isinstance(raw_spec, dict) else None
    valid = isinstance(given, int) and not isinstance(given, bool) and 0 < given < 65536
    return given if valid else SERVICE_PORT


def endpoint_url(namespace: str, isvc_name: str, path: str = "", port: int = SERVICE_PORT) -> str:
    return f"http://{service_name(isvc_name)}.{namespace}.svc.cluster.local:{port}{path}"


def label_value(value: str) -> str:
    """`value` made a valid label value (at most 63 of [A-Za-z0-9._-], alphanumeric at both
    ends): other characters become '-'. "Apple M5 Max" -> "Apple-M5-Max"."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


def _labels(isvc_name: str) -> dict[str, str]:
    return {"app": isvc_name, MANAGED_BY_LABEL: MANAGED_BY_VALUE, ISVC_LABEL: isvc_name}


def _inference_labels(reg: Registration) -> dict[str, str]:
    labels = {INFERENCE_SERVICE_LABEL: label_value(reg.isvc_name), INFERENCE_RUNTIME_LABEL: label_value(reg.runtime)}
    if model := label_value(reg.model):
        labels[INFERENCE_MODEL_LABEL] = model
    return labels


def _owner(reg: Registration) -> list[dict]:
    # Lets the cluster's garbage collector clean up if the ISVC is deleted while no agent runs.
    return [{
        "apiVersion": "inference.llmkube.dev/v1alpha1", "kind": "InferenceService",
        "name": reg.isvc_name, "uid": reg.isvc_uid, "controller": False, "blockOwnerDeletion": False,
    }] if reg.isvc_uid else []


def desired_service(reg: Registration) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(reg.isvc_name),
            "namespace": reg.namespace,
            "labels": {**_labels(reg.isvc_name), **_inference_labels(reg)},
            "annotations": {"llmkube.ai/metal-accelerated": "true", "llmkube.ai/native-process": "true"},
            "ownerReferences": _owner(reg),
        },
        "spec": {
            "type": "ClusterIP",
            # In a fleet each Mac's llama-server has its own port: the port's name says where
            # to go (kube-proxy takes a selector-less Service's port from the slices).
            "ports": [{"name": PORT_NAME, "port": reg.service_port, "targetPort": PORT_NAME if reg.member else reg.port,
                       "protocol": "TCP"}],
        },
    }


def desired_slice(reg: Registration, *, heartbeat: str, agent_version: str, host: str = "") -> dict:
    svc = service_name(reg.isvc_name)
    host_label = {HOST_LABEL: value} if (value := label_value(host)) else {}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(reg.isvc_name, reg.member),
            "namespace": reg.namespace,
            "labels": {**_labels(reg.isvc_name), **_inference_labels(reg), **host_label,
                       SERVICE_NAME_LABEL: svc, SLICE_MANAGED_BY_LABEL: "metal-agent.llmkube.ai",
                       **({FLEET_MEMBER_LABEL: reg.member} if reg.member else {})},
            "annotations": {HEARTBEAT_ANNOTATION: heartbeat, VERSION_ANNOTATION: agent_version},
            "ownerReferences": _owner(reg),
        },
        "addressType": address_type(reg.address),
        "endpoints": [{
            "addresses": [reg.address],
            "conditions": {"ready": reg.ready, "serving": reg.ready, "terminating": False},
        }],
        "ports": [{"name": PORT_NAME, "port": reg.port, "protocol": "TCP"}],
    }
