"""Read this host's identity for `host_info`: name, chip, macOS version, memory.

On macOS the chip is `machdep.cpu.brand_string` ("Apple M5 Max") and the
version comes from `platform.mac_ver()` (a plist read, no subprocess);
elsewhere (the Linux machines tests run on) the CPU model from /proc/cpuinfo.
Read once at start-up; none of it changes while the agent runs.
"""

from __future__ import annotations

import asyncio
import platform
import socket
import sys
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, Info

from metal_agent.adapters.host_cpu import sysctl_text
from metal_agent.core.host_info import HostFacts, cpu_model_from_cpuinfo, host_info_labels
from metal_agent.core.names import METRIC_PREFIX


async def read_host_facts() -> HostFacts:
    if sys.platform == "darwin":
        chip = await sysctl_text("machdep.cpu.brand_string") or ""
        version = platform.mac_ver()[0]
    else:
        try:
            chip = cpu_model_from_cpuinfo(await asyncio.to_thread(Path("/proc/cpuinfo").read_text))
        except OSError:
            chip = ""
        version = ""
    return HostFacts(host=socket.gethostname(), chip=chip, macos_version=version,
                     memory_bytes=psutil.virtual_memory().total)


def register_host_info(registry: CollectorRegistry, facts: HostFacts, agent_version: str) -> Info:
    """`llmkube_metal_agent_host_info{hostname,chip,macos_version,memory_bytes,agent_version} 1`."""
    info = Info(METRIC_PREFIX + "host", "This Mac: host name, chip, macOS version, memory, agent version (value 1).",
                registry=registry)
    info.info(host_info_labels(facts, agent_version))
    return info
