"""Load on demand, unload when idle (issue 21, point 3), end to end: the real agent with the real
front door, real kube-apiserver and real llama-server, the "Mac" a network namespace as in
test_front_door_agent.py; clients call the service's stable port as a cluster client would.

- an idle on-demand model is unloaded after its (short) idle duration: no process, its slice
  still ready, status Idle, an Event saying why; a request then loads it (a cold start) and is
  answered, with an Event saying a request arrived;
- memory short (the Model's memoryBudget fits one tiny service, not two): a service that needs
  room unloads an idle on-demand one, least recently used first; a busy one (a request in flight,
  its engine frozen with SIGSTOP so that the request stays in flight) is never unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import aiohttp
import psutil
import pytest

from metal_agent.adapters.process.front_door_process import RECORD_FILE, read_record
from metal_agent.adapters.process.records import live_process
from metal_agent.core.names import GROUP, VERSION
from metal_agent.core.on_demand import IDLE_AFTER, ON_DEMAND
from tests.integration.test_front_door_agent import pushed_table, read_slice, stable_ports
from tests.support import netns
from tests.support.agent import agents_in_netns
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

restarts: list = []  # the running test's agent maker (a second agent after a restart)
BODY = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    # One tiny service is estimated at ~1.27 GiB (test_models_and_memory.py): one fits, two do not.
    await cluster.create_model("tiny", f"file://{tiny_model}", hardware={"accelerator": "metal", "memoryBudget": "2000Mi"})
    # A frozen engine (SIGSTOP, to keep a request in flight) is not restarted during the test.
    args = ("--front-door", "--front-door-access", "open", "--heartbeat-interval", "1", "--liveness-failures", "100")
    try:
        async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                                   llama_server=llama_server_bin, workdir=tmp_path, namespaces=(namespace,),
                                   extra_args=args) as (ns, make_agent):
            agent = make_agent()
            await agent.start()
            restarts.append(make_agent)
            yield cluster, ns, agent, tmp_path / "state"
    finally:
        record = read_record(tmp_path / "state" / RECORD_FILE)
        if record is not None and live_process(record):  # the front door outlives agents by design
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)


async def create_on_demand(cluster: Cluster, name: str, idle: str) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
            "metadata": {"name": name, "annotations": {ON_DEMAND: "true", IDLE_AFTER: idle}},
            "spec": {"modelRef": "tiny", "contextSize": 256, "parallelSlots": 1}}
    await cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.ns, "inferenceservices", body)


def route_state(state_dir, key: str) -> str | None:
    for route in pushed_table(state_dir).get("routes", []):
        if route["key"] == key:
            return route["state"]
    return None


async def process_reason(cluster: Cluster, name: str, reason: str) -> dict | None:
    found = await cluster.condition(name, "MetalProcessReady")
    return found if found and found.get("reason") == reason else None


async def event_messages(cluster: Cluster, name: str, reason: str) -> list[str]:
    return [e.message for e in await cluster.events(name) if e.reason == reason]


async def engine_pid(agent, key: str) -> int | None:
    rows = [r for r in await agent.services() if r["service"] == key]
    return rows[0]["pid"] if rows and rows[0]["state"] == "Ready" else None


async def ask(ns, port: int, model: str, timeout: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.post(f"http://{ns.inner_ip}:{port}/v1/chat/completions", json={**BODY, "model": model}) as resp:
            return resp.status, await resp.text(), time.monotonic() - started


async def test_an_idle_model_is_unloaded_and_a_request_loads_it_again(mac):
    cluster, ns, agent, state = mac
    key = f"{cluster.ns}/cold"
    await create_on_demand(cluster, "cold", "2s")
    await cluster.wait_phase("cold", "Ready")
    pid = await wait_for(lambda: engine_pid(agent, key), timeout=30, what="the engine serving")
    port = stable_ports(state)[key]

    # Idle for 2 s: unloaded, the slice still ready on the front door's port, status Idle.
    idle = await wait_for(lambda: process_reason(cluster, "cold", "Idle"), timeout=30, what="status Idle")
    assert "idle for 2s" in idle["message"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert [r for r in await agent.services() if r["service"] == key] == []
    await wait_for(lambda: route_state(state, key) == "sleeping", timeout=10, what="the route sleeping")
    found = await read_slice(cluster, "cold")
    assert found.endpoints[0].conditions.ready and [p.port for p in found.ports] == [port]
    assert (await cluster.status("cold"))["phase"] == "Ready"
    assert "unloaded: idle for 2s" in (await event_messages(cluster, "cold", "UnloadedIdle"))[0]
    status, body = await agent._get("/v1/services")
    assert [r["state"] for r in json.loads(body)["routes"] if r["service"] == key] == ["Idle"]

    # A request loads it: held by the front door while the engine starts, then answered.
    code, text, took = await ask(ns, port, "cold")
    assert code == 200, text
    await cluster.wait_event("cold", "LoadingOnDemand")
    assert "a request arrived" in (await event_messages(cluster, "cold", "LoadingOnDemand"))[0]
    assert await engine_pid(agent, key) not in (None, pid)
    # ... and it goes to sleep again when quiet.
    await cluster.wait_event("cold", "UnloadedIdle", count=2, timeout=30)


async def test_memory_short_unloads_the_idle_on_demand_model_but_never_a_busy_one(mac):
    cluster, ns, agent, state = mac
    first, second = f"{cluster.ns}/first", f"{cluster.ns}/second"
    await create_on_demand(cluster, "first", "1h")
    await cluster.wait_phase("first", "Ready")
    first_pid = await wait_for(lambda: engine_pid(agent, first), timeout=30, what="first serving")

    # `second` needs the memory `first` holds; `first` is idle: it is unloaded to make room.
    await create_on_demand(cluster, "second", "1h")
    await cluster.wait_phase("second", "Ready", timeout=60)
    idle = await wait_for(lambda: process_reason(cluster, "first", "Idle"), timeout=30, what="first Idle")
    assert f"evicted for {second} under memory shortage" in idle["message"]
    assert f"evicted for {second}" in (await event_messages(cluster, "first", "UnloadedForMemory"))[0]
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE
    found = await read_slice(cluster, "first")
    assert found.endpoints[0].conditions.ready  # asleep, still answered for

    # A request for `first` loads it; `second`, idle now, makes room the same way.
    code, text, _ = await ask(ns, stable_ports(state)[first], "first")
    assert code == 200, text
    await cluster.wait_event("second", "UnloadedForMemory")
    await cluster.wait_event("first", "LoadingOnDemand")

    # `second` busy: its engine frozen with a request in flight. A request for it wakes it (it
    # evicts the idle `first`), then one for `first` must wait for memory: `second` is not unloaded.
    code, text, _ = await ask(ns, stable_ports(state)[second], "second")
    assert code == 200, text
    second_pid = await wait_for(lambda: engine_pid(agent, second), timeout=30, what="second serving")
    await cluster.wait_event("first", "UnloadedForMemory", count=2)
    os.kill(second_pid, signal.SIGSTOP)
    try:
        stuck = asyncio.create_task(ask(ns, stable_ports(state)[second], "second", timeout=120))
        await wait_for(lambda: _inflight(agent, second), timeout=10, what="a request in flight on second")
        waiting = asyncio.create_task(ask(ns, stable_ports(state)[first], "first", timeout=120))
        status = await wait_for(lambda: _scheduling(cluster, "first", "InsufficientMemory"), timeout=30,
                                what="first waiting for memory")
        assert second in status["schedulingMessage"]
        assert (await cluster.event_reasons("second")).count("UnloadedForMemory") == 1  # not again
        assert psutil.pid_exists(second_pid)
        assert route_state(state, first) == "starting"  # held, not refused, while it waits
    finally:
        os.kill(second_pid, signal.SIGCONT)
    code, text, _ = await stuck
    assert code == 200, text  # the frozen request completes: nothing killed its engine
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def _inflight(agent, key: str) -> bool:
    status, body = await agent._get("/v1/services")
    rows = [r for r in json.loads(body).get("routes", []) if r["service"] == key]
    return bool(rows and rows[0]["inflight"])


async def _scheduling(cluster: Cluster, name: str, reason: str) -> dict | None:
    status = await cluster.status(name)
    return status if status.get("schedulingStatus") == reason else None


async def test_a_model_asleep_when_the_agent_restarts_sleeps_on_and_wakes_on_request(mac):
    cluster, ns, agent, state = mac
    key = f"{cluster.ns}/nap"
    await create_on_demand(cluster, "nap", "1s")
    await cluster.wait_phase("nap", "Ready")
    await wait_for(lambda: process_reason(cluster, "nap", "Idle"), timeout=30, what="status Idle")
    await wait_for(lambda: route_state(state, key) == "sleeping", timeout=10, what="the route sleeping")
    version = pushed_table(state)["version"]
    agent.kill()  # SIGKILL; the front door serves on
    again = restarts[-1]()
    await again.start()
    # The new agent has reconciled every service once, then pushed its table.
    await wait_for(lambda: pushed_table(state)["version"] > version, timeout=30, what="the new agent's table")
    assert route_state(state, key) == "sleeping" and await again.services() == []  # not loaded by the restart
    code, text, _ = await ask(ns, stable_ports(state)[key], "nap")
    assert code == 200, text
    assert (await cluster.event_reasons("nap")).count("LoadingOnDemand") == 1
