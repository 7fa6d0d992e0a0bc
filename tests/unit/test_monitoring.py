"""manifests/monitoring/ against the objects the agent registers and the names it exports.

The scrape config's relabelling is applied (tests/support/relabel.py) to the
meta labels Prometheus's `endpointslice` discovery derives from the exact
bodies the agent applies, and must give the target labels of
core/scrape_targets.py; the integration test holds a real Prometheus to the
same labels. The ServiceMonitors must say the same as the scrape config, the
PrometheusRule the same as the plain rule file, and the Prometheus role must
grant what discovery and the agent's authorizer ask for, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from metal_agent.core.agent_registration import AgentEndpoint, desired_agent_service, desired_agent_slice
from metal_agent.core.registration import Registration, desired_service, desired_slice
from metal_agent.core.scrape_targets import agent_target_labels, inference_target_labels
from tests.support.relabel import sanitize, slice_meta_labels, target_labels

MONITORING = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"
REG = Registration(namespace="ml", isvc_name="qwen.chat", isvc_uid="u", address="100.64.1.2", port=41234,
                   ready=True, model="qwen3-8b")
ENDPOINT = AgentEndpoint("metal-agent", "Johns-MacBook-Pro.local", "Apple M5 Max", "100.64.1.2", 9090)


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MONITORING / name).read_text()) if d]


def jobs() -> dict[str, dict]:
    (config,) = load("scrape-config.yaml")
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_a_model_slice_becomes_an_llmkube_inference_target_with_llmkubes_labels():
    meta = slice_meta_labels(desired_slice(REG, heartbeat="t", agent_version="v", host="Johns-MacBook-Pro.local"))
    got = target_labels(jobs()["llmkube-inference"], meta)
    assert got == {**inference_target_labels(REG, "Johns-MacBook-Pro.local"), "instance": "100.64.1.2:41234"}
    assert got["job"] == "llmkube-inference" and got["service"] == "qwen.chat" and got["runtime"] == "llamacpp"


def test_the_agent_slice_becomes_a_metal_agent_target_with_host_and_chip():
    meta = slice_meta_labels(desired_agent_slice(ENDPOINT, heartbeat="t", agent_version="v"))
    got = target_labels(jobs()["metal-agent"], meta)
    assert got == {**agent_target_labels(ENDPOINT), "instance": "100.64.1.2:9090"}
    assert got["host"] == "Johns-MacBook-Pro.local"
    assert "chip" not in got  # host_info carries it; a target label would rename the scraped one


def test_each_job_keeps_only_its_own_slices():
    model = slice_meta_labels(desired_slice(REG, heartbeat="t", agent_version="v"))
    agent = slice_meta_labels(desired_agent_slice(ENDPOINT, heartbeat="t", agent_version="v"))
    assert target_labels(jobs()["llmkube-inference"], agent) is None
    assert target_labels(jobs()["metal-agent"], model) is None
    # Someone else's slice (a GPU pod's, which LLMKube's own PodMonitor scrapes) is not ours to scrape.
    foreign = dict(model, **{"__meta_kubernetes_endpointslice_label_llmkube_ai_managed_by": "someone"})
    assert target_labels(jobs()["llmkube-inference"], foreign) is None


def test_the_agent_job_sends_a_token_and_looks_in_the_agents_namespace_only():
    job = jobs()["metal-agent"]
    assert job["authorization"]["credentials_file"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert job["kubernetes_sd_configs"] == [{"role": "endpointslice", "namespaces": {"names": ["metal-agent"]}}]
    assert jobs()["llmkube-inference"]["kubernetes_sd_configs"] == [{"role": "endpointslice"}]


def _relabel_targets(rules: list[dict]) -> dict[str, str]:
    """targetLabel -> where it comes from ('=' + replacement for a constant)."""
    out = {}
    for rule in rules:
        src = rule.get("sourceLabels") or rule.get("source_labels")
        target = rule.get("targetLabel") or rule.get("target_label")
        if target:
            out[target] = src[0].replace("__meta_kubernetes_service_label_", "__meta_kubernetes_endpointslice_label_") \
                if src else "=" + rule["replacement"]
    return out


def test_the_servicemonitors_say_what_the_scrape_config_says():
    monitors = {m["metadata"]["name"]: m["spec"] for m in load("servicemonitors.yaml")}
    inference, agent = monitors["llmkube-inference-metal"], monitors["metal-agent"]
    for spec in (inference, agent):
        assert spec["serviceDiscoveryRole"] == "EndpointSlice"  # selector-less Services have no Endpoints
    assert inference["namespaceSelector"] == {"any": True}
    service_labels = desired_service(REG)["metadata"]["labels"]
    assert set(inference["selector"]["matchLabels"].items()) <= set(service_labels.items())
    assert [e["key"] for e in inference["selector"]["matchExpressions"]] == ["inference.llmkube.dev/service"]
    assert "inference.llmkube.dev/service" in service_labels
    assert set(agent["selector"]["matchLabels"].items()) <= set(desired_agent_service("metal-agent", 9090)["metadata"]["labels"].items())
    (endpoint,) = inference["endpoints"]
    assert endpoint["port"] == "http"
    plain = _relabel_targets(jobs()["llmkube-inference"]["relabel_configs"])
    plain.pop("namespace")  # the operator adds namespace itself
    assert _relabel_targets(endpoint["relabelings"]) == plain | {"job": "=llmkube-inference"}
    (endpoint,) = agent["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["bearerTokenFile"].endswith("serviceaccount/token")
    plain = _relabel_targets(jobs()["metal-agent"]["relabel_configs"])
    plain.pop("namespace")
    assert _relabel_targets(endpoint["relabelings"]) == plain | {"job": "=metal-agent"}


def test_the_prometheusrule_carries_the_plain_rule_files_groups():
    (plain,) = load("recording-rules.yaml")
    (rule,) = load("prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule" and rule["spec"] == plain


def test_the_rules_join_what_the_targets_carry():
    """Energy per token joins a Mac's agent and llama-server targets on `host`."""
    (plain,) = load("recording-rules.yaml")
    exprs = " ".join(r["expr"] for g in plain["groups"] for r in g["rules"])
    assert 'llmkube_metal_agent_apple_power_energy_joules_total{component="combined"}' in exprs
    assert 'llamacpp:tokens_predicted_total{job="llmkube-inference"}' in exprs
    assert "on (host)" in exprs
    assert "host" in inference_target_labels(REG, "m") and "host" in agent_target_labels(ENDPOINT)


def test_the_prometheus_role_grants_discovery_and_metrics_only():
    docs = load("prometheus-rbac.yaml")
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    grants = set()
    for rule in role["rules"]:
        for verb in rule["verbs"]:
            for url in rule.get("nonResourceURLs", []):
                grants.add(("url", url, verb))
            for group in rule.get("apiGroups", []):
                for resource in rule["resources"]:
                    grants.add((group, resource, verb))
    assert grants == {
        ("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "services", "list"), ("", "services", "watch"), ("", "pods", "list"), ("", "pods", "watch"),
        ("url", "/metrics", "get"),
    }
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_sanitize_matches_prometheus():
    assert sanitize("inference.llmkube.dev/service") == "inference_llmkube_dev_service"
