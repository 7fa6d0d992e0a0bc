"""The Service and per-Mac EndpointSlice that let a cluster's Prometheus find each agent.

Every agent applies the same selector-less Service `metal-agent` in its own
namespace and one EndpointSlice named for its host, pointing at the address
it registers for its models and the port its metrics listen on. Prometheus
(ServiceMonitor or `kubernetes_sd_configs` role `endpointslice`) then finds
every Mac with one selector and takes `host` and `chip` from the slice's
labels. These objects deliberately do not carry the managed-by label of the
model objects: the start-up clean-up deletes every managed-by object that no
InferenceService explains, and these are explained by the agent itself.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from metal_agent.core.registration import (
    HEARTBEAT_ANNOTATION,
    HOST_LABEL,
    SERVICE_NAME_LABEL,
    SLICE_MANAGED_BY_LABEL,
    VERSION_ANNOTATION,
    address_type,
    label_value,
)

AGENT_SERVICE = "metal-agent"
DEFAULT_AGENT_NAMESPACE = "metal-agent"
METRICS_PORT_NAME = "metrics"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT_VALUE = "agent-metrics"
CHIP_LABEL = "llmkube.ai/chip"
#: What an agent's own objects carry: the selector for the ServiceMonitor, and
#: what `_ours` checks before a delete.
AGENT_LABELS = {NAME_LABEL: AGENT_SERVICE, COMPONENT_LABEL: COMPONENT_VALUE}


@dataclass(frozen=True)
class AgentEndpoint:
    """Everything that decides this Mac's slice (heartbeat aside)."""

    namespace: str
    host: str  # host name as the Mac reports it
    chip: str  # e.g. "Apple M5 Max"; "" when unknown
    address: str
    port: int


def host_slug(host: str) -> str:
    """A DNS-1123 label for `host`: "Johns-MacBook-Pro.local" -> "johns-macbook-pro".

    A name with nothing usable in it gets a digest, so two such Macs still differ."""
    short = host.strip().removesuffix(".local").split(".")[0].lower()
    slug = re.sub(r"[^a-z0-9-]+", "-", short).strip("-")[:50].strip("-")
    return slug or "host-" + hashlib.sha256(host.encode()).hexdigest()[:10]


def agent_slice_name(host: str) -> str:
    return f"{AGENT_SERVICE}-{host_slug(host)}"


def desired_agent_service(namespace: str, port: int) -> dict:
    """Shared by every Mac (each applies the same content); its port is nominal, the
    slices carry each Mac's real one."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": AGENT_SERVICE, "namespace": namespace, "labels": dict(AGENT_LABELS)},
        "spec": {
            "type": "ClusterIP",
            "ports": [{"name": METRICS_PORT_NAME, "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def agent_slice_labels(endpoint: AgentEndpoint) -> dict[str, str]:
    labels = {**AGENT_LABELS, SERVICE_NAME_LABEL: AGENT_SERVICE, SLICE_MANAGED_BY_LABEL: "metal-agent.llmkube.ai"}
    if host := label_value(endpoint.host):
        labels[HOST_LABEL] = host
    if chip := label_value(endpoint.chip):
        labels[CHIP_LABEL] = chip
    return labels


def desired_agent_slice(endpoint: AgentEndpoint, *, heartbeat: str, agent_version: str) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": agent_slice_name(endpoint.host),
            "namespace": endpoint.namespace,
            "labels": agent_slice_labels(endpoint),
            "annotations": {HEARTBEAT_ANNOTATION: heartbeat, VERSION_ANNOTATION: agent_version},
        },
        "addressType": address_type(endpoint.address),
        "endpoints": [{
            "addresses": [endpoint.address],
            "conditions": {"ready": True, "serving": True, "terminating": False},
        }],
        "ports": [{"name": METRICS_PORT_NAME, "port": endpoint.port, "protocol": "TCP"}],
    }
