"""Models and memory through the whole agent: downloads, admission, pressure (real API server, real llama-server)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import psutil
import pytest

from metal_agent.adapters.process.records import RecordStore
from metal_agent.app.config import (AgentConfig, ControllerSettings, EngineSettings, HttpSettings, KubeSettings,
                                    MemorySettings, RegistrationSettings)
from metal_agent.app.manager import run_agent
from metal_agent.core.pressure import MemoryReading
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.paths import AgentPaths
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.http_models import ModelHTTPServer
from tests.support.isvc import Cluster
from tests.support.procs import process_gone
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GiB = 2**30


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def env(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    agents: list[AgentProcess] = []

    def make_agent(*extra: str) -> AgentProcess:
        agent = AgentProcess(AgentOptions(
            kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin, workdir=tmp_path,
            namespaces=(namespace,), extra_args=extra,
        ))
        agents.append(agent)
        return agent

    server = await ModelHTTPServer().start()
    try:
        yield cluster, make_agent, server
    finally:
        for agent in agents:
            if agent.process and agent.process.running:
                await agent.stop()
        await server.stop()
        kill_recorded_processes(tmp_path / "state")


async def scheduling(cluster: Cluster, name: str, reason: str):
    status = await cluster.status(name)
    return status if status.get("schedulingStatus") == reason else None


async def test_over_budget_model_never_spawns_and_says_why(env, tiny_model):
    cluster, make_agent, _ = env
    await cluster.create_model("tiny", f"file://{tiny_model}", hardware={"accelerator": "metal", "memoryBudget": "64Mi"})
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("big", "tiny", contextSize=256)
    status = await wait_for(lambda: scheduling(cluster, "big", "InsufficientMemory"), timeout=20, what="InsufficientMemory")
    assert status["phase"] == "Pending"
    message = status["schedulingMessage"]
    assert "GiB" in message and "exceeds the budget" in message and "memoryBudget" in message
    assert await agent.services() == []
    await cluster.wait_event("big", "InsufficientMemory")


async def test_second_service_waits_for_memory_then_starts(env, tiny_model):
    cluster, make_agent, _ = env
    # One tiny service is estimated at ~1.27 GiB (weights + KV + 256 MiB overhead + the 1 GiB host
    # prompt cache its --cache-ram allows): one fits, two do not.
    await cluster.create_model("tiny", f"file://{tiny_model}", hardware={"accelerator": "metal", "memoryBudget": "2000Mi"})
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("first", "tiny", contextSize=256)
    await cluster.wait_phase("first", "Ready")
    await cluster.create_isvc("second", "tiny", contextSize=256)
    status = await wait_for(lambda: scheduling(cluster, "second", "InsufficientMemory"), timeout=20, what="second waits")
    assert f"{cluster.ns}/first" in status["schedulingMessage"]  # names what holds the memory
    assert len(await agent.services()) == 1

    await cluster.delete_isvc("first")
    status = await cluster.wait_phase("second", "Ready", timeout=30)
    assert "schedulingStatus" not in status  # cleared once it fits


async def test_download_resumes_twice_and_verifies(env, tiny_model):
    cluster, make_agent, server = env
    data = tiny_model.read_bytes()
    url = server.add("/models/tiny.gguf", data, drop_after=[len(data) // 3, len(data) // 3])
    await cluster.create_model("remote", url, sha256=hashlib.sha256(data).hexdigest())
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("fetched", "remote", contextSize=256)
    await cluster.wait_phase("fetched", "Ready", timeout=60)
    ranges = [seen.range for seen in server.requests_for("/models/tiny.gguf")]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:3])
    served_from = Path(psutil_cmdline_value(agent, "--model"))
    assert file_sha256(served_from) == hashlib.sha256(data).hexdigest()


def psutil_cmdline_value(agent: AgentProcess, flag: str) -> str:
    import psutil

    pids = [c.pid for c in psutil.Process(agent.process.pid).children(recursive=True)]
    for pid in pids:
        argv = psutil.Process(pid).cmdline()
        if flag in argv:
            return argv[argv.index(flag) + 1]
    raise AssertionError(f"no llama-server with {flag}")


async def test_wrong_sha256_fails_and_leaves_no_file(env, tiny_model, tmp_path):
    cluster, make_agent, server = env
    url = server.add("/models/evil.gguf", tiny_model.read_bytes())
    await cluster.create_model("evil", url, sha256="0" * 64)
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("evil", "evil", contextSize=256)
    status = await cluster.wait_phase("evil", "Failed", timeout=30)
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert "0" * 64 in available["message"] and hashlib.sha256(tiny_model.read_bytes()).hexdigest() in available["message"]
    leftovers = [p for p in (tmp_path / "models").rglob("*") if p.is_file() and p.name.startswith("evil.gguf")]
    assert leftovers == []
    assert await agent.services() == []


async def test_slow_download_does_not_delay_another_service(env, tiny_model):
    cluster, make_agent, server = env
    data = tiny_model.read_bytes()
    # ~60 s for the whole file: 290 KiB every second.
    url = server.add("/models/slow.gguf", data, trickle=(len(data) // 60, 1.0))
    await cluster.create_model("slow", url)
    await cluster.create_model("local", f"file://{tiny_model}")
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("slow", "slow", contextSize=256)
    await cluster.create_isvc("quick", "local", contextSize=256)
    await cluster.wait_phase("quick", "Ready", timeout=20)

    async def downloading():
        cond = await cluster.condition("slow", "Available")
        return cond if cond and cond["reason"] == "ModelDownloading" and "MiB" in cond["message"] else None
    cond = await wait_for(downloading, timeout=20, what="download progress in the condition")
    assert (await cluster.status("slow"))["phase"] == "Creating"
    assert "downloading" in cond["message"]


class Readings:
    """Memory readings the test sets; the agent's watchdog reads them (the injected-reader seam)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.available = total

    async def __call__(self) -> MemoryReading:
        return MemoryReading(total_bytes=self.total, available_bytes=self.available)


async def test_critical_pressure_evicts_the_right_victim_and_normal_brings_it_back(
        control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    readings = Readings(total=64 * GiB)
    cfg = AgentConfig(
        paths=AgentPaths(tmp_path / "models", tmp_path / "logs", tmp_path / "state"),
        engines=EngineSettings(llama_server=str(llama_server_bin), threads=1, mlock=False),
        kube=KubeSettings(kubeconfig=str(control_plane.agent_kubeconfig), namespaces=(namespace,)),
        registration=RegistrationSettings(host_ip="127.0.0.1", register=False), http=HttpSettings(port=0),
        memory=MemorySettings(eviction=True, interval=0.2, reader=readings),
        # the model store is tmp_path/models
        controller=ControllerSettings(policy=SpecPolicy(model_roots=(str(tiny_model.parent),))),
    )
    stop = asyncio.Event()
    agent = asyncio.create_task(run_agent(cfg, stop=stop, handle_signals=False))
    try:
        await cluster.create_isvc("batch-job", "tiny", contextSize=256, priority="batch")
        await cluster.create_isvc("vip", "tiny", contextSize=256, priority="high")
        await cluster.wait_phase("batch-job", "Ready", timeout=30)
        await cluster.wait_phase("vip", "Ready", timeout=30)
        vip_pid = await _pid_from_status_log(tmp_path, "vip")
        batch_pid = await _pid_from_status_log(tmp_path, "batch-job")

        # Critical, with our two llama-servers holding 80 % of the memory in use: the pressure is
        # ours, so the friendly-fire guard lets the eviction through.
        ours = sum(psutil.Process(pid).memory_info().rss for pid in (vip_pid, batch_pid))
        readings.total = int(ours / 0.8 / 0.95)
        readings.available = int(0.05 * readings.total)

        async def evicted():
            cond = await cluster.condition("batch-job", "MemoryPressure")
            return cond if cond and cond["reason"] == "Evicted" else None
        await wait_for(evicted, timeout=20, what="batch-job evicted")
        await cluster.wait_event("batch-job", "Evicted")
        assert (await cluster.condition("vip", "MemoryPressure"))["reason"] == "Critical"
        assert await _pid_from_status_log(tmp_path, "vip") == vip_pid  # the high-priority one is untouched
        assert (await cluster.status("batch-job"))["phase"] == "Pending"  # RespawnBlocked while pressure lasts

        readings.available = int(0.5 * readings.total)  # Normal again
        await cluster.wait_phase("batch-job", "Ready", timeout=30)
        cond = await cluster.condition("batch-job", "MemoryPressure")
        assert cond["status"] == "False" and cond["reason"] == "Normal"
        await cluster.wait_event("vip", "MemoryPressureLevelChanged")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent, 30)
        kill_recorded_processes(tmp_path / "state")


async def _pid_from_status_log(state_dir: Path, name: str) -> int | None:
    for record in RecordStore(state_dir / "state" / "processes").load_all():
        if record.key.endswith(f"/{name}") and not process_gone(record.pid):
            return record.pid
    return None
