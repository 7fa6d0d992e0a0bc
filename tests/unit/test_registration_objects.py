"""Service/EndpointSlice bodies and host-address choice, against the wire contract."""

from __future__ import annotations

import pytest

from metal_agent.core.host_address import NoUsableAddress, choose_host_ip, validate_host_ip
from metal_agent.core.registration import (
    Registration,
    desired_service,
    desired_slice,
    endpoint_url,
    label_value,
    service_name,
    service_name_problem,
    service_port,
)

REG = Registration(namespace="ml", isvc_name="qwen.coder", isvc_uid="u-1", address="100.101.1.2", port=41234, ready=True,
                   model="qwen3-coder")
INFERENCE_LABELS = {"inference.llmkube.dev/service": "qwen.coder", "inference.llmkube.dev/model": "qwen3-coder",
                    "inference.llmkube.dev/runtime": "llamacpp"}


def test_service_is_selectorless_with_contract_labels_and_port():
    svc = desired_service(REG)
    assert svc["metadata"]["name"] == "qwen-coder"
    assert "selector" not in svc["spec"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": 41234, "protocol": "TCP"}]
    assert svc["metadata"]["labels"] == {
        "app": "qwen.coder", "llmkube.ai/managed-by": "metal-agent", "llmkube.ai/inference-service": "qwen.coder",
        **INFERENCE_LABELS}
    assert svc["metadata"]["annotations"] == {
        "llmkube.ai/metal-accelerated": "true", "llmkube.ai/native-process": "true"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_slice_points_at_the_mac():
    body = desired_slice(REG, heartbeat="2026-11-27T10:00:00Z", agent_version="0.1.0")
    assert body["metadata"]["labels"]["kubernetes.io/service-name"] == "qwen-coder"
    assert body["metadata"]["annotations"] == {
        "llmkube.ai/agent-heartbeat": "2026-11-27T10:00:00Z", "llmkube.ai/agent-version": "0.1.0"}
    assert body["addressType"] == "IPv4"
    assert body["endpoints"] == [{"addresses": ["100.101.1.2"],
                                  "conditions": {"ready": True, "serving": True, "terminating": False}}]
    assert body["ports"] == [{"name": "http", "port": 41234, "protocol": "TCP"}]


def test_slice_carries_llmkubes_inference_labels_and_the_host():
    """The labels LLMKube's PodMonitor promotes (service = the InferenceService's own name, as
    on its pods), and which Mac serves it; an unusable character in a value becomes '-'."""
    body = desired_slice(REG, heartbeat="t", agent_version="v", host="Johns MacBook Pro.local")
    labels = body["metadata"]["labels"]
    assert {k: labels[k] for k in INFERENCE_LABELS} == INFERENCE_LABELS
    assert labels["llmkube.ai/host"] == "Johns-MacBook-Pro.local"
    assert "llmkube.ai/host" not in desired_slice(REG, heartbeat="t", agent_version="v")["metadata"]["labels"]


def test_another_runtime_and_a_model_less_service():
    reg = Registration("ml", "a", "", "10.0.0.1", 1, True, runtime="mlx")
    labels = desired_service(reg)["metadata"]["labels"]
    assert labels["inference.llmkube.dev/runtime"] == "mlx"
    assert "inference.llmkube.dev/model" not in labels


@pytest.mark.parametrize("raw,value", [("Apple M5 Max", "Apple-M5-Max"), ("--x--", "x"), ("é", ""),
                                       ("a" * 80, "a" * 63), ("qwen3.5:35b", "qwen3.5-35b")])
def test_label_values_are_made_valid(raw, value):
    assert label_value(raw) == value


def test_ipv6_and_not_ready():
    body = desired_slice(Registration("ml", "a", "", "fd7a:115c::1", 1, False), heartbeat="t", agent_version="v")
    assert body["addressType"] == "IPv6"
    assert body["endpoints"][0]["conditions"]["ready"] is False
    assert body["metadata"]["ownerReferences"] == []


@pytest.mark.parametrize("name,problem", [("a.b.c", None), ("9lives", "must start with a letter"),
                                          ("x" * 64, "longer than 63")])
def test_service_name_rules(name, problem):
    found = service_name_problem(name)
    assert (found is None) if problem is None else (problem in found)


def test_endpoint_url():
    assert endpoint_url("ml", "qwen.coder") == "http://qwen-coder.ml.svc.cluster.local:8080"
    assert endpoint_url("ml", "qwen.coder", "/v1/models", 9000) == "http://qwen-coder.ml.svc.cluster.local:9000/v1/models"


@pytest.mark.parametrize(("spec", "port"), [
    ({}, 8080), (None, 8080), ({"endpoint": {}}, 8080), ({"endpoint": {"port": 9000}}, 9000),
    ({"endpoint": {"port": 0}}, 8080), ({"endpoint": {"port": 70000}}, 8080), ({"endpoint": {"port": True}}, 8080),
    ({"endpoint": {"port": "9000"}}, 8080),
])
def test_endpoint_port_is_the_services_port(spec, port):
    """LLMKube's operator gives its Services `spec.endpoint.port` (service_builder.go) and writes it into
    status.endpoint; the CRD bounds it to 1-65535, anything else (no CRD: render) keeps 8080."""
    assert service_port(spec) == port
    svc = desired_service(Registration(**{**REG.__dict__, "service_port": service_port(spec)}))
    assert svc["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": 41234, "protocol": "TCP"}]
    assert service_name("a.b") == "a-b"


ADDRS = [("lo0", "127.0.0.1"), ("en0", "fe80::1%en0"), ("bridge100", "192.168.65.3"), ("docker0", "172.17.0.1"),
         ("en0", "192.168.1.20"), ("utun4", "100.100.7.9"), ("en1", "10.97.0.4")]


@pytest.mark.parametrize("addresses,primary,expected,why", [
    (ADDRS, "192.168.1.20", "100.100.7.9", "Tailscale"),
    ([a for a in ADDRS if a[0] != "utun4"], "192.168.1.20", "192.168.1.20", "default route"),
    ([("lo0", "127.0.0.1"), ("en5", "fd00::5"), ("en0", "192.168.1.20")], None, "192.168.1.20", "first routable"),
], ids=["tailscale-first", "default-route", "first-routable-v4"])
def test_host_ip_preference(addresses, primary, expected, why):
    choice = choose_host_ip(addresses, primary)
    assert choice.address == expected and why in choice.reason


def test_no_usable_address():
    with pytest.raises(NoUsableAddress):
        choose_host_ip([("lo0", "127.0.0.1"), ("docker0", "172.17.0.1"), ("en1", "10.100.0.1")], None)


@pytest.mark.parametrize("value", ["127.0.0.1", "::1", "0.0.0.0", "169.254.1.1", "mac.local", "300.1.1.1"])
def test_registered_host_ip_is_rejected(value):
    with pytest.raises(ValueError):
        validate_host_ip(value)


def test_loopback_is_fine_without_registration():
    assert validate_host_ip("127.0.0.1", registered=False) == "127.0.0.1"
    assert validate_host_ip("fd7a:115c:a1e0::1") == "fd7a:115c:a1e0::1"


def test_only_our_label_for_this_service_or_its_uid_as_owner_makes_an_object_ours():
    from metal_agent.core.registration import ours

    mine = {"llmkube.ai/managed-by": "metal-agent", "llmkube.ai/inference-service": "qwen.coder"}
    assert ours(mine, [], "qwen.coder", "u-1")
    assert ours(mine, [], "qwen.coder", "")  # deleting: the InferenceService (and its uid) is gone
    assert not ours({**mine, "llmkube.ai/inference-service": "qwen-coder"}, [], "qwen.coder", "u-1")  # same Service name
    assert not ours({"llmkube.ai/managed-by": "someone"}, [], "qwen.coder", "u-1")
    assert not ours(None, [], "qwen.coder", "u-1")
    assert not ours({"app": "qwen.coder"}, ["u-2"], "qwen.coder", "u-1")
    assert ours({"app": "qwen.coder"}, ["u-2", "u-1"], "qwen.coder", "u-1")  # handed over by its owner
    assert not ours({}, [""], "qwen.coder", "")  # no uid never matches an empty owner uid


def test_conflict_message_names_the_object_and_what_to_do():
    from metal_agent.core.registration import conflict_message

    text = conflict_message("Service", "ml", "db")
    assert text.startswith("Service ml/db already exists and is not metal-agent's")
    assert "rename the InferenceService or remove that Service" in text
