"""manifests/grafana/metal-agent-dashboard.json queries only metrics the agent exports.

The names are taken from the metric objects themselves (registered on a
fresh registry, exactly as the daemon does), not from a copy of the list, so
renaming a metric in code without updating the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

import yaml

from metal_agent.adapters.host_facts import register_host_info
from metal_agent.adapters.powermetrics import PowerGauges
from metal_agent.core.host_info import HostFacts
from metal_agent.metrics import AgentMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "manifests" / "grafana" / "metal-agent-dashboard.json"
RULES = DASHBOARD.parents[1] / "monitoring" / "recording-rules.yaml"
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("_info",)}


def exported_series() -> set[str]:
    registry = CollectorRegistry()
    AgentMetrics(registry)
    PowerGauges(registry)
    register_host_info(registry, HostFacts("h", "c", "v", 1), "0")
    return {family.name + suffix for family in registry.collect() for suffix in SERIES_SUFFIXES[family.type]}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def test_every_expr_uses_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    used = set()
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for expr in exprs(dashboard):
        names = set(re.findall(r"(?<![\w:])llmkube_metal_agent_\w+", expr))
        rules = set(re.findall(r"\b[a-z_]+:[a-z0-9_:]+\b", expr))
        assert names or rules, f"query uses no metal-agent metric or recording rule: {expr}"
        assert names <= exported, f"{expr}: not exported by the agent: {sorted(names - exported)}"
        assert rules <= recorded, f"{expr}: not recorded by {RULES.name}: {sorted(rules - recorded)}"
        used |= names | rules
    assert {
        "llmkube_metal_agent_managed_processes",
        "llmkube_metal_agent_process_healthy",
        "llmkube_metal_agent_process_restarts_total",
        "llmkube_metal_agent_respawns_total",
        "llmkube_metal_agent_process_startup_seconds_bucket",
        "llmkube_metal_agent_watch_consecutive_failures",
        "llmkube_metal_agent_apple_power_combined_watts",
        "llmkube_metal_agent_apple_power_gpu_watts",
        "llmkube_metal_agent_apple_power_cpu_watts",
        "llmkube_metal_agent_apple_power_ane_watts",
        "llmkube_metal_agent_apple_power_sampler_up",
        "llmkube_metal_agent_apple_power_energy_joules_total",
        "llmkube_metal_agent_apple_gpu_active_ratio",
        "llmkube_metal_agent_apple_gpu_active_frequency_hertz",
        "llmkube_metal_agent_host_info",
        "host:llamacpp_tokens_predicted:rate5m",
        "model:llamacpp_tokens_predicted:rate5m",
        "host:llmkube_joules_per_token:ratio_rate5m",
        "model:llmkube_joules_per_token:ratio_rate5m",
    } <= used


def test_datasource_variable_drives_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
