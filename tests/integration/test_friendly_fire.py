"""The friendly-fire guard with the real agent: Critical pressure from other processes evicts
nothing and says so; the same level with our llama-servers holding most of the memory evicts.

The agent runs as a user runs it (`metal-agent run --eviction-enabled`), its memory watchdog
fed through the memory readings file (`--memory-readings-file`): macOS's figures and its
kernel pressure level exist only on a Mac and cannot be pushed to Critical on cue here. The
file gives the machine (total, available, the kernel's level); our llama-servers' resident
memory is measured by the agent itself, from the real processes.
"""

from __future__ import annotations

import psutil
import pytest

from metal_agent.adapters.process.records import RecordStore
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.isvc import Cluster
from tests.support.memory_file import MemoryFile
from tests.support.procs import process_gone
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

FOREIGN = "pressure comes from other processes"
SKIPPED = "llmkube_metal_agent_evictions_skipped_total"


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    memory = MemoryFile(tmp_path / "memory.json")
    agent = AgentProcess(AgentOptions(
        kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin, workdir=tmp_path,
        namespaces=(namespace,),
        extra_args=("--eviction-enabled", "--memory-interval", "0.5", "--memory-readings-file", str(memory.path)),
    ))
    await agent.start()
    try:
        yield cluster, agent, memory
    finally:
        if agent.process and agent.process.running:
            await agent.stop()
        kill_recorded_processes(tmp_path / "state")


def live_pid(state_dir, name: str) -> int | None:
    for record in RecordStore(state_dir / "processes").load_all():
        if record.key.endswith(f"/{name}") and not process_gone(record.pid):
            return record.pid
    return None


async def test_pressure_from_other_processes_is_refused_and_pressure_from_ours_evicts(mac, tmp_path):
    cluster, agent, memory = mac
    await cluster.create_isvc("batch-job", "tiny", contextSize=256, priority="batch")
    await cluster.create_isvc("vip", "tiny", contextSize=256, priority="high")
    await cluster.wait_phase("batch-job", "Ready", timeout=60)
    await cluster.wait_phase("vip", "Ready", timeout=60)
    pids = {name: live_pid(tmp_path / "state", name) for name in ("batch-job", "vip")}
    assert all(pids.values()), pids

    # A build job or a browser: 97 % of 64 GiB in use, our two tiny llama-servers a sliver of it.
    memory.critical(in_use=int(0.97 * memory.total))

    async def refused_three_times() -> bool:
        return (await agent.metric(SKIPPED, {"reason": "PressureFromOtherProcesses"}) or 0) >= 3
    await wait_for(refused_three_times, timeout=30, what="three watchdog checks refusing to evict")
    assert all(not process_gone(pid) for pid in pids.values()), "a model was stopped for someone else's memory"
    assert (await agent.metric("llmkube_metal_agent_evictions_total")) == 0
    assert (await agent.metric("llmkube_metal_agent_memory_own_share_ratio")) < 0.01

    async def explained(name: str):
        cond = await cluster.condition(name, "MemoryPressure")
        return cond if cond and cond["reason"] == "Critical" and FOREIGN in cond["message"] else None
    for name in ("batch-job", "vip"):
        cond = await wait_for(lambda: explained(name), timeout=20, what=f"{name}'s MemoryPressure naming the cause")
        assert cond["status"] == "True" and "eviction needs more than 50%" in cond["message"]
    await cluster.wait_event("batch-job", "EvictionSkipped")
    skipped = [e for e in await cluster.events("batch-job") if e.reason == "EvictionSkipped"]
    assert len(skipped) == 1 and FOREIGN in skipped[0].message and skipped[0].type == "Warning"
    assert agent.log_text().count("the pressure comes from other processes; not evicting") >= 1
    assert (await cluster.status("batch-job"))["phase"] == "Ready"

    # The same level, but now our llama-servers hold 80 % of the memory in use: ours to relieve.
    memory.critical_from_ours(list(pids.values()))

    async def evicted():
        cond = await cluster.condition("batch-job", "MemoryPressure")
        return cond if cond and cond["reason"] == "Evicted" else None
    await wait_for(evicted, timeout=30, what="batch-job evicted")
    await wait_for(lambda: process_gone(pids["batch-job"]), timeout=30, what="the evicted llama-server to stop")
    await cluster.wait_event("batch-job", "Evicted")
    assert live_pid(tmp_path / "state", "vip") == pids["vip"]  # the high-priority one is untouched
    assert (await agent.metric("llmkube_metal_agent_evictions_total")) == 1

    memory.set(0.5)  # Normal: the evicted service comes back
    await cluster.wait_phase("batch-job", "Ready", timeout=60)
    cond = await cluster.condition("batch-job", "MemoryPressure")
    assert cond["status"] == "False" and FOREIGN not in cond["message"]
    assert agent.process.running
