"""`rolloutPolicy.waitForIdle` and `maxPodLifetimeSeconds` (issue 22) end to end: the real agent with
the real front door (whose activity says "idle"), real kube-apiserver and real llama-server, the
"Mac" a network namespace as in test_front_door_agent.py.

- a changed spec waits while a streaming request is in flight (status RolloutDeferred, the same
  engine serving), and respawns once the client is done;
- an engine older than maxPodLifetimeSeconds is recycled (a new process, Event Recycling).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import aiohttp
import pytest

from metal_agent.adapters.process.front_door_process import RECORD_FILE, read_record
from metal_agent.adapters.process.records import live_process
from tests.integration.test_front_door_agent import stable_ports
from tests.support import netns
from tests.support.agent import agents_in_netns
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

#: Thousands of tokens on the tiny model: certainly still streaming while the test looks.
LONG = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000, "ignore_eos": True, "stream": True}


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    args = ("--front-door", "--front-door-access", "open", "--heartbeat-interval", "1")
    try:
        async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                                   llama_server=llama_server_bin, workdir=tmp_path, namespaces=(namespace,),
                                   extra_args=args) as (ns, make_agent):
            agent = make_agent()
            await agent.start()
            yield cluster, ns, agent, tmp_path / "state"
    finally:
        record = read_record(tmp_path / "state" / RECORD_FILE)
        if record is not None and live_process(record):  # the front door outlives agents by design
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)


async def engine_pid(agent, key: str) -> int | None:
    rows = [r for r in await agent.services() if r["service"] == key]
    return rows[0]["pid"] if rows and rows[0]["state"] == "Ready" else None


async def test_a_changed_spec_waits_for_the_request_in_flight_then_respawns(mac):
    cluster, ns, agent, state = mac
    key = f"{cluster.ns}/steady"
    await cluster.create_isvc("steady", "tiny", contextSize=8192, parallelSlots=1,
                              rolloutPolicy={"waitForIdle": True, "idleTimeoutSeconds": 300})
    await cluster.wait_phase("steady", "Ready")
    pid = await wait_for(lambda: engine_pid(agent, key), timeout=30, what="the engine serving")
    port = stable_ports(state)[key]
    await wait_for(lambda: _listening(ns.inner_ip, port), timeout=30, what="the front door's listener")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        stream = await http.post(f"http://{ns.inner_ip}:{port}/v1/chat/completions", json={**LONG, "model": "steady"})
        assert stream.status == 200 and (await stream.content.readline()).startswith(b"data: ")
        await cluster.patch_isvc("steady", {"contextSize": 4096})

        async def deferred():
            cond = await cluster.condition("steady", "Progressing")
            return cond if cond and cond["reason"] == "RolloutDeferred" else None

        cond = await wait_for(deferred, timeout=30, what="Progressing/RolloutDeferred")
        assert "requests are in flight" in cond["message"]
        await cluster.wait_event("steady", "RolloutDeferred")
        assert await engine_pid(agent, key) == pid  # still the old engine, still streaming
        assert (await stream.content.readline()) is not None
        stream.close()  # the client is done: the service is idle
    new = await wait_for(lambda: _other_pid(agent, key, pid), timeout=30, what="the respawn once idle")
    assert new != pid
    assert "Respawning" in await cluster.event_reasons("steady")


async def test_an_engine_past_its_lifetime_is_recycled(mac):
    cluster, ns, agent, state = mac
    key = f"{cluster.ns}/aging"
    await cluster.create_isvc("aging", "tiny", contextSize=256, maxPodLifetimeSeconds=3)
    await cluster.wait_phase("aging", "Ready")
    pid = await wait_for(lambda: engine_pid(agent, key), timeout=30, what="the engine serving")
    await wait_for(lambda: _other_pid(agent, key, pid), timeout=30, what="the engine recycled")
    await cluster.wait_event("aging", "Recycling")


async def _listening(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    return True


async def _other_pid(agent, key: str, pid: int) -> int | None:
    found = await engine_pid(agent, key)
    return found if found not in (None, pid) else None
