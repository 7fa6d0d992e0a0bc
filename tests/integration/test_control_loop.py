"""The control loop end to end: real API server (agent identity under RBAC), real agent, real llama-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import aiohttp
import psutil
import pytest

from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.isvc import Cluster
from tests.support.procs import process_gone
from tests.support.slowness import scaled
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    """A namespace, a metal Model on the tiny GGUF, and a factory for agents watching it."""
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    agents: list[AgentProcess] = []

    def make_agent(*extra: str) -> AgentProcess:
        agent = AgentProcess(AgentOptions(
            kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin, workdir=tmp_path,
            namespaces=(namespace,), extra_args=("--liveness-interval", "0.5", "--liveness-failures", "2", *extra),
        ))
        agents.append(agent)
        return agent

    yield cluster, make_agent
    for agent in agents:
        if agent.process and agent.process.running:
            await agent.stop()
    # Safety net: never leave a llama-server behind, even when a test failed half-way.
    kill_recorded_processes(tmp_path / "state")


async def ready_service(cluster: Cluster, make_agent, name: str, **spec) -> tuple[AgentProcess, str, int]:
    """Start an agent and one InferenceService on the tiny model; wait until Ready.
    Returns the agent, the service key and the llama-server pid."""
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc(name, "tiny", **spec)
    await cluster.wait_phase(name, "Ready")
    key = f"{cluster.ns}/{name}"
    return agent, key, await service_pid(agent, key)


async def service_pid(agent: AgentProcess, key: str, state: str | None = "Ready") -> int | None:
    for row in await agent.services():
        if row["service"] == key and (state is None or row["state"] == state):
            return row["pid"]
    return None


def conditions_by_type(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}


def cmdline(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()


async def test_create_ready_scale_and_delete(env):
    cluster, make_agent = env
    agent = make_agent()
    await agent.start()
    key = f"{cluster.ns}/chat"
    await cluster.create_isvc("chat", "tiny", contextSize=512)
    status = await cluster.wait_phase("chat", "Ready")
    assert status["readyReplicas"] == 1 and status["desiredReplicas"] == 1
    available = await cluster.condition("chat", "Available")
    assert available["status"] == "True"
    assert status["acceleration"]["device"] == "CPU"  # a CPU-only build says so; on a Mac this reads Metal
    pid = await service_pid(agent, key)
    assert "--ctx-size" in cmdline(pid) and cmdline(pid)[cmdline(pid).index("--ctx-size") + 1] == "512"
    assert "Started" in await cluster.wait_event("chat", "Ready")
    assert (await agent.metric("llmkube_metal_agent_reconciles_total", {"outcome": "ok"}) or 0) >= 1

    # replicas 1 -> 2 changes nothing on a Mac: same process; as LLMKube counts it, 1 of 2 is not Ready.
    await cluster.patch_isvc("chat", {"replicas": 2})
    gen = (await cluster.isvc("chat"))["metadata"]["generation"]
    await wait_for(lambda: _observed(cluster, "chat", gen), timeout=10, what="observedGeneration")
    status = await cluster.wait_phase("chat", "Progressing")
    assert (status["readyReplicas"], status["desiredReplicas"]) == (1, 2)
    assert await service_pid(agent, key) == pid

    # replicas 0 -> process gone, phase Stopped.
    await cluster.patch_isvc("chat", {"replicas": 0})
    await cluster.wait_phase("chat", "Stopped")
    assert process_gone(pid)
    assert await agent.services() == []

    # back to 1 -> a new process, Ready again.
    await cluster.patch_isvc("chat", {"replicas": 1})
    await cluster.wait_phase("chat", "Ready")
    pid = await service_pid(agent, key)

    # delete -> process gone within a second (on an idle machine: tests/support/slowness.py).
    await cluster.delete_isvc("chat")
    started = time.monotonic()
    await wait_for(lambda: process_gone(pid), timeout=30, what="llama-server to exit", interval=0.01)
    assert time.monotonic() - started <= scaled(1.0)


async def _observed(cluster: Cluster, name: str, generation: int) -> bool:
    """LLMKube's CRD has no status.observedGeneration: the conditions carry it."""
    cond = await cluster.condition(name, "MetalProcessReady")
    return bool(cond) and cond.get("observedGeneration") == generation


async def test_spec_drift_respawns_exactly_once(env):
    cluster, make_agent = env
    agent, key, old_pid = await ready_service(cluster, make_agent, "drift", contextSize=512)

    await cluster.patch_isvc("drift", {"contextSize": 1024})
    new_pid = await wait_for(lambda: _new_ready_pid(agent, key, old_pid), timeout=30, what="respawned llama-server")
    argv = cmdline(new_pid)
    assert argv[argv.index("--ctx-size") + 1] == "1024"
    assert process_gone(old_pid)
    await cluster.wait_phase("drift", "Ready")
    assert (await cluster.wait_event("drift", "Respawning")).count("Respawning") == 1
    assert await agent.metric("llmkube_metal_agent_respawns_total", {"name": "drift", "namespace": cluster.ns}) == 1
    assert await agent.metric("llmkube_metal_agent_process_restarts_total", {"name": "drift", "namespace": cluster.ns}) in (None, 0)


async def _new_ready_pid(agent: AgentProcess, key: str, old_pid: int) -> int | None:
    pid = await service_pid(agent, key)
    return pid if pid and pid != old_pid else None


async def test_crash_is_restarted_with_backoff_and_reported(env):
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "crashy", contextSize=256)

    os.kill(pid, signal.SIGKILL)
    new_pid = await wait_for(lambda: _new_ready_pid(agent, key, pid), timeout=30, what="restarted llama-server")
    assert new_pid != pid
    await cluster.wait_phase("crashy", "Ready")
    reasons = await cluster.wait_event("crashy", "Restarting")
    assert "ProcessExited" in reasons and "Restarting" in reasons
    restarts = await agent.metric("llmkube_metal_agent_process_restarts_total", {"name": "crashy", "namespace": cluster.ns})
    assert restarts == 1
    exited = [e for e in await cluster.events("crashy") if e.reason == "ProcessExited"]
    assert "SIGKILL" in exited[0].message


async def test_unsupported_cache_type_fails_with_stderr_line(env):
    cluster, make_agent = env
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("turbo", "tiny", contextSize=256, cacheTypeCustomK="turbo3", cacheTypeCustomV="turbo3")
    # Phase and conditions from ONE read: the crash loop keeps rewriting status (Failed while
    # backing off, Progressing/ModelLoading while restarting), and each write is whole.
    conditions = conditions_by_type(await cluster.wait_phase("turbo", "Failed"))
    available = conditions["Available"]
    assert available["status"] == "False" and available["reason"] == "ProcessExited"
    assert "turbo3" in available["message"]  # llama-server's own line naming the unsupported type
    assert conditions["Degraded"]["reason"] == "CrashLoopBackOff"


async def test_owned_flag_in_extra_args_keeps_serving_degraded(env):
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "typo", contextSize=256)

    await cluster.patch_isvc("typo", {"extraArgs": ["--port=1234"]})

    async def degraded():
        cond = await cluster.condition("typo", "Degraded")
        return cond if cond and cond["reason"] == "ExtraArgRefused" else None

    cond = await wait_for(degraded, timeout=15, what="Degraded/ExtraArgRefused")
    assert "spec.extraArgs[0]" in cond["message"]
    assert (await cluster.status("typo"))["phase"] == "Ready"
    assert await service_pid(agent, key) == pid
    await cluster.wait_event("typo", "ExtraArgRefused")

    # The next valid change is acted on.
    await cluster.patch_isvc("typo", {"extraArgs": []})
    async def healed():
        cond = await cluster.condition("typo", "Degraded")
        accepted = await cluster.condition("typo", "MetalSpecAccepted")
        return (cond is None or cond["status"] == "False") and accepted and accepted["status"] == "True"
    await wait_for(healed, timeout=15, what="Degraded cleared")
    assert await service_pid(agent, key) == pid  # extraArgs [] == unset: same spec hash


async def test_invalid_spec_never_spawns(env):
    cluster, make_agent = env
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("bad", "tiny", extraArgs=["--host", "0.0.0.0"])
    status = await cluster.wait_phase("bad", "Failed")
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert available["reason"] == "ExtraArgRefused" and "spec.extraArgs[0]" in available["message"]
    assert await agent.services() == []


async def test_a_field_the_agent_cannot_honour_is_refused_by_name_never_dropped(env):
    """LLMKube fields the agent does not do on a Mac (core.fields): a new service with one never
    starts, a change adding one leaves the running process serving, each with reason UnsupportedField."""
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "lifetime", contextSize=256)
    await cluster.create_isvc("public", "tiny", contextSize=256, endpoint={"type": "LoadBalancer"})
    status = await cluster.wait_phase("public", "Failed")
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert available["reason"] == "UnsupportedField" and "spec.endpoint.type" in available["message"]

    await cluster.patch_isvc("lifetime", {"hotCacheMaxSize": "50GB"})

    async def degraded():
        cond = await cluster.condition("lifetime", "Degraded")
        return cond if cond and cond["reason"] == "UnsupportedField" else None

    cond = await wait_for(degraded, timeout=15, what="Degraded/UnsupportedField")
    assert "spec.hotCacheMaxSize" in cond["message"]
    assert await service_pid(agent, key) == pid
    await cluster.wait_event("lifetime", "UnsupportedField")
    assert [row["service"] for row in await agent.services()] == [key]


async def test_model_leaving_metal_stops_the_process(env):
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "moved", contextSize=256)
    await cluster.patch_model("tiny", {"hardware": {"accelerator": "cuda"}})
    await wait_for(lambda: process_gone(pid), timeout=10, what="llama-server stopped")
    assert await agent.services() == []


async def test_agent_restart_adopts_without_reload(env):
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "keep", contextSize=256)

    agent.kill()
    await agent.process.wait(timeout=10)
    assert not process_gone(pid)

    await agent.start()
    adopted = await wait_for(lambda: service_pid(agent, key), timeout=20, what="adopted service Ready")
    assert adopted == pid
    rows = await agent.services()
    assert rows[0]["adopted"] is True
    reasons = await cluster.wait_event("keep", "Ready")
    assert reasons.count("Started") == 1  # no second spawn: zero model reloads


async def test_spec_change_while_agent_down_respawns_once(env):
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "offline", contextSize=256)

    agent.kill()
    await agent.process.wait(timeout=10)
    await cluster.patch_isvc("offline", {"contextSize": 768})
    await agent.start()
    new_pid = await wait_for(lambda: _new_ready_pid(agent, key, pid), timeout=30, what="respawned service")
    argv = cmdline(new_pid)
    assert argv[argv.index("--ctx-size") + 1] == "768"
    assert process_gone(pid)
    assert (await cluster.wait_event("offline", "Started", count=2)).count("Started") == 2


async def test_status_and_logs_commands_read_the_running_agent(env):
    cluster, make_agent = env
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("shown", "tiny", contextSize=256)
    await cluster.wait_phase("shown", "Ready")
    pid = await service_pid(agent, f"{cluster.ns}/shown")

    status = await run_cli("status", "--listen", f"127.0.0.1:{agent.port}", "--json")
    rows = json.loads(status)["services"]
    assert [(r["service"], r["state"], r["pid"]) for r in rows] == [(f"{cluster.ns}/shown", "Ready", pid)]
    table = await run_cli("status", "--listen", f"127.0.0.1:{agent.port}")
    assert f"{cluster.ns}/shown" in table and str(pid) in table and "Ready" in table

    logs = await run_cli("logs", f"{cluster.ns}/shown", "--log-dir", str(agent.options.workdir / "logs"))
    assert "model loaded" in logs  # llama-server's own log, captured by the agent


async def run_cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "metal_agent", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_api_outage_restarts_nothing_and_status_converges(env, control_plane):
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "steady", contextSize=256)

    await control_plane.stop_apiserver()
    try:
        # While the API is gone the agent notices (watch failures) but keeps serving.
        await wait_for(lambda: _watch_failing(agent), timeout=30, what="watch failures counted")
        outage_started = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # something to report once the API is back
        new_pid = await wait_for(lambda: _new_ready_pid(agent, key, pid), timeout=30, what="restart during outage")
        remaining = 20 - (time.monotonic() - outage_started)
        if remaining > 0:
            await asyncio.sleep(remaining)  # the outage itself lasts 20 s; nothing waits on it
    finally:
        await control_plane.start_apiserver()

    async def converged():
        status = await cluster.status("steady")
        return status.get("phase") == "Ready" and status.get("conditions") and \
            (await agent.metric("llmkube_metal_agent_watch_consecutive_failures")) == 0
    await wait_for(converged, timeout=60, what="status to converge after the outage")
    assert await service_pid(agent, key) == new_pid  # no restart beyond the one we caused
    assert await agent.metric("llmkube_metal_agent_process_restarts_total", {"name": "steady", "namespace": cluster.ns}) == 1
    await cluster.wait_event("steady", "ProcessExited")


async def _watch_failing(agent: AgentProcess) -> bool:
    return ((await agent.metric("llmkube_metal_agent_watch_consecutive_failures")) or 0) > 0


async def test_typo_made_while_agent_down_keeps_the_model_serving(env):
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "sturdy", contextSize=256)

    agent.kill()
    await agent.process.wait(timeout=10)
    await cluster.patch_isvc("sturdy", {"extraArgs": ["--port=1"]})
    await agent.start()

    async def degraded():
        cond = await cluster.condition("sturdy", "Degraded")
        return cond if cond and cond["reason"] == "ExtraArgRefused" else None
    cond = await wait_for(degraded, timeout=20, what="Degraded/ExtraArgRefused after restart")
    assert "spec.extraArgs[0]" in cond["message"]
    assert await wait_for(lambda: service_pid(agent, key), timeout=20, what="kept process Ready") == pid
    status = await cluster.wait_phase("sturdy", "Ready")
    assert next(c for c in status["conditions"] if c["type"] == "Degraded")["reason"] == "ExtraArgRefused"

    await cluster.patch_isvc("sturdy", {"extraArgs": []})  # fixed: the same spec as the running process
    async def healed():
        cond = await cluster.condition("sturdy", "Degraded")
        accepted = await cluster.condition("sturdy", "MetalSpecAccepted")
        return (cond is None or cond["status"] == "False") and accepted and accepted["status"] == "True"
    await wait_for(healed, timeout=20, what="Degraded cleared")
    assert await service_pid(agent, key) == pid
    assert (await cluster.wait_event("sturdy", "Started")).count("Started") == 1


async def _readyz(agent: AgentProcess) -> tuple[int, str]:
    return await agent._get("/readyz")


async def test_started_while_the_api_is_away_it_keeps_models_healthy(env, control_plane):
    """Offline like a kubelet: an agent (re)started during an outage supervises the recorded
    llama-servers at once, restarts one that dies, says why it is not ready, never exits,
    and converges when the API returns, without reloading what runs."""
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "offline", contextSize=256)
    await agent.stop()
    await control_plane.stop_apiserver()
    try:
        await agent.start(wait_ready=False)
        await wait_for(lambda: _alive(agent), timeout=30, what="agent /healthz", on_timeout=agent.process.tail)
        assert await wait_for(lambda: service_pid(agent, key), timeout=20, what="recorded process supervised") == pid
        status, text = await _readyz(agent)
        assert status == 503 and ("API server unreachable" in text or "waiting for the first list" in text), text
        assert (await agent._get("/healthz"))[0] == 200

        os.kill(pid, signal.SIGKILL)
        restarted = await wait_for(lambda: _new_ready_pid(agent, key, pid), timeout=30, what="restart during outage")
        assert agent.process.running
    finally:
        await control_plane.start_apiserver()
    await wait_for(lambda: _ready(agent), timeout=60, what="/readyz 200 after the outage")
    await cluster.wait_phase("offline", "Ready")
    assert await service_pid(agent, key) == restarted  # taken over, not reloaded
    assert await agent.metric("llmkube_metal_agent_respawns_total", {"name": "offline", "namespace": cluster.ns}) in (None, 0)


async def _ready(agent: AgentProcess) -> bool:
    return (await _readyz(agent))[0] == 200


async def _alive(agent: AgentProcess) -> bool:
    try:
        return (await agent._get("/healthz"))[0] == 200
    except (aiohttp.ClientError, OSError):
        return False


async def test_another_writers_conditions_survive_our_writes(env):
    """Status is applied server-side, our fields only: a condition another writer adds
    (LLMKube's controller, a user's tool) is never clobbered, however stale our cache."""
    cluster, make_agent = env
    agent, key, pid = await ready_service(cluster, make_agent, "shared", contextSize=256)
    foreign = {"type": "ExternalCheck", "status": "True", "reason": "Fine", "message": "added by another writer",
               "lastTransitionTime": "2026-01-01T00:00:00Z"}
    obj = await cluster.isvc("shared")
    conditions = [*obj["status"]["conditions"], foreign]
    await cluster.custom.patch_namespaced_custom_object_status(
        "inference.llmkube.dev", "v1alpha1", cluster.ns, "inferenceservices", "shared",
        {"status": {"conditions": conditions}}, _content_type="application/merge-patch+json")

    await cluster.patch_isvc("shared", {"contextSize": 512})  # our status changes: loading, then ready
    await wait_for(lambda: _new_ready_pid(agent, key, pid), timeout=30, what="respawned")
    await cluster.wait_phase("shared", "Ready")
    assert await cluster.condition("shared", "ExternalCheck") == foreign
