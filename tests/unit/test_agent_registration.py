"""The agent's own Service and per-Mac EndpointSlice: what the cluster's Prometheus discovers."""

from __future__ import annotations

import pytest

from metal_agent.core.agent_registration import (
    AgentEndpoint,
    agent_slice_name,
    desired_agent_service,
    desired_agent_slice,
    host_slug,
)
from metal_agent.core.names import is_dns1123_label
from metal_agent.core.registration import MANAGED_BY_LABEL

ENDPOINT = AgentEndpoint("metal-agent", "Johns-MacBook-Pro.local", "Apple M5 Max", "100.64.1.2", 9090)


@pytest.mark.parametrize("host,slug", [
    ("Johns-MacBook-Pro.local", "johns-macbook-pro"), ("mac-mini-3", "mac-mini-3"),
    ("studio.example.com", "studio"), ("Büro Mac", "b-ro-mac"), ("-x-", "x"),
])
def test_host_slugs(host, slug):
    assert host_slug(host) == slug


def test_a_host_with_nothing_usable_still_gets_a_distinct_valid_name():
    a, b = host_slug("ééé"), host_slug("øøø")
    assert a != b and is_dns1123_label(a) and is_dns1123_label(b)
    assert is_dns1123_label(host_slug("x" * 200))


def test_service_is_selectorless_and_shared():
    svc = desired_agent_service("metal-agent", 9090)
    assert svc["metadata"]["name"] == "metal-agent" and "selector" not in svc["spec"]
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]


def test_slice_names_the_mac_and_carries_host_and_chip():
    body = desired_agent_slice(ENDPOINT, heartbeat="2026-11-30T10:00:00Z", agent_version="0.2.0")
    assert body["metadata"]["name"] == agent_slice_name(ENDPOINT.host) == "metal-agent-johns-macbook-pro"
    labels = body["metadata"]["labels"]
    assert labels["kubernetes.io/service-name"] == "metal-agent"
    assert labels["llmkube.ai/host"] == "Johns-MacBook-Pro.local" and labels["llmkube.ai/chip"] == "Apple-M5-Max"
    assert labels["app.kubernetes.io/component"] == "agent-metrics"
    assert body["metadata"]["annotations"] == {"llmkube.ai/agent-heartbeat": "2026-11-30T10:00:00Z",
                                               "llmkube.ai/agent-version": "0.2.0"}
    assert body["endpoints"] == [{"addresses": ["100.64.1.2"],
                                  "conditions": {"ready": True, "serving": True, "terminating": False}}]
    assert body["ports"] == [{"name": "metrics", "port": 9090, "protocol": "TCP"}]


def test_the_model_cleanup_never_takes_the_agents_objects_for_leftovers():
    """The start-up clean-up deletes every object with the models' managed-by label that no
    InferenceService explains; the agent's own objects must not carry it."""
    assert MANAGED_BY_LABEL not in desired_agent_service("metal-agent", 9090)["metadata"]["labels"]
    assert MANAGED_BY_LABEL not in desired_agent_slice(ENDPOINT, heartbeat="t", agent_version="v")["metadata"]["labels"]


def test_unknown_chip_is_left_out():
    body = desired_agent_slice(AgentEndpoint("ns", "h", "", "10.0.0.1", 1), heartbeat="t", agent_version="v")
    assert "llmkube.ai/chip" not in body["metadata"]["labels"]
