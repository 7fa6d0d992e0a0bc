"""What tells one Mac from another on a dashboard: the `host_info` labels.

Several Macs scrape into one Prometheus; `llmkube_metal_agent_host_info`
(value 1, in the style of `node_uname_info`) carries the facts that make a
row recognisable, and the scrape target's `host` label (relabelled from the Mac's EndpointSlice)
joins it to everything else a Mac exports.
Pure: the adapter (`adapters/host_facts.py`) reads the facts.
"""

from __future__ import annotations

from dataclasses import dataclass

# `hostname`, not `host`: the scrape target already has `host` (from its EndpointSlice), and a
# scraped label that collides with a target label would be renamed `exported_host`.
HOST_INFO_LABELS = ("hostname", "chip", "macos_version", "memory_bytes", "agent_version")


@dataclass(frozen=True, slots=True)
class HostFacts:
    host: str  # the host name as the Mac reports it (also the `host` label of the scrape target)
    chip: str  # "Apple M5 Max"; the CPU model elsewhere; "" if unknown
    macos_version: str  # "26.1"; "" when not macOS
    memory_bytes: int  # physical RAM


def host_info_labels(facts: HostFacts, agent_version: str) -> dict[str, str]:
    return {
        "hostname": facts.host, "chip": facts.chip, "macos_version": facts.macos_version,
        "memory_bytes": str(facts.memory_bytes), "agent_version": agent_version,
    }


def cpu_model_from_cpuinfo(text: str) -> str:
    """The CPU model named in Linux's /proc/cpuinfo ("model name", or "Model" on ARM boards)."""
    for key in ("model name", "Model", "Hardware"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return ""
