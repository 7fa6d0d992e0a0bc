"""The agent side of the front door end to end (`--front-door`), real kube-apiserver and real
llama-server, the "Mac" a network namespace as in test_registration.py.

The front door is the real one (`metal-agent front-door`, spawned by the agent): the slice on
the stable port, the engine on loopback, the table the front door is handed, a cluster client's
request through the stable port, the port surviving an agent restart, and the front door
process adopted (not restarted) across one. The front door runs in `open` access mode here:
who may call is tested in test_front_door_access.py and tests/security/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import aiohttp
import psutil
import pytest
from kubernetes_asyncio import client

from metal_agent.adapters.process.front_door_process import RECORD_FILE, read_record
from metal_agent.adapters.process.records import live_process
from tests.support import netns
from tests.support.agent import agents_in_netns
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]



@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    args = ("--front-door", "--front-door-access", "open", "--heartbeat-interval", "1")
    try:
        async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                                   llama_server=llama_server_bin, workdir=tmp_path, namespaces=(namespace,),
                                   extra_args=args) as (ns, make_agent):
            yield cluster, ns, make_agent, tmp_path / "state"
    finally:
        record = read_record(tmp_path / "state" / RECORD_FILE)
        if record is not None and live_process(record):  # the front door outlives agents by design
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)


async def read_slice(cluster: Cluster, name: str):
    discovery = client.DiscoveryV1Api(cluster.api)
    found = await discovery.list_namespaced_endpoint_slice(cluster.ns, label_selector=f"kubernetes.io/service-name={name}")
    return found.items[0] if found.items else None


def stable_ports(state: Path) -> dict[str, int]:
    path = state / "front-door-ports.json"
    return json.loads(path.read_text())["ports"] if path.exists() else {}


def pushed_table(state: Path) -> dict:
    path = state / "front-door-table.json"  # where the front door keeps the last table it was handed
    return json.loads(path.read_text()) if path.exists() else {}


def serving_route(state: Path, key: str) -> dict | None:
    routes = [r for r in pushed_table(state).get("routes", []) if r["key"] == key and r["state"] == "serving"]
    return routes[0] if routes else None


async def test_the_slice_points_at_the_stable_port_which_survives_an_agent_restart(mac):
    cluster, ns, make_agent, state = mac
    agent = make_agent()
    await agent.start()
    key = f"{cluster.ns}/chat"
    await cluster.create_isvc("chat", "tiny", contextSize=256, parallelSlots=2)
    await cluster.wait_phase("chat", "Ready")
    route = await wait_for(lambda: serving_route(state, key), timeout=30, what="the route serving in the table")
    port = stable_ports(state)[key]
    row = (await agent.services())[0]
    # The front door is handed the engine on loopback and the service's stable port.
    assert route["port"] == port and route["upstream"] == f"127.0.0.1:{row['port']}"
    assert route["model"] == "chat" and route["max_inflight"] == 2 and route["queue"] == 64
    assert pushed_table(state)["listen_host"] == ns.inner_ip and pushed_table(state)["client_port"] == 9999
    argv = psutil.Process(row["pid"]).cmdline()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # only the front door reaches the engine
    found = await read_slice(cluster, "chat")
    assert found.endpoints[0].addresses == [ns.inner_ip] and found.endpoints[0].conditions.ready
    assert [(p.name, p.port) for p in found.ports] == [("http", port)]
    status, body = await agent._get("/v1/services")
    assert status == 200 and json.loads(body)["routes"][0]["port"] == port
    scraped = await agent.metrics()  # the front door's own metrics ride along with the agent's
    assert "metal_agent_" in scraped and "llmkube_metal_agent_front_door_table_version" in scraped
    # A cluster client through the slice: the front door's stable port, then the engine.
    async with aiohttp.ClientSession() as http:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with http.post(f"http://{ns.inner_ip}:{port}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()

    door = read_record(state / RECORD_FILE)
    assert door is not None and live_process(door)
    version = pushed_table(state)["version"]  # before the kill: the next agent may push at once
    agent.kill()  # SIGKILL: nothing tidied up
    again = make_agent()
    await again.start()
    # Adopted, not restarted: the same front door process, the same engine, the same port.
    assert read_record(state / RECORD_FILE).pid == door.pid and live_process(door)
    await wait_for(lambda: _took_over(again, row["pid"]), timeout=30, what="the engine taken over")
    assert stable_ports(state)[key] == port
    await wait_for(lambda: pushed_table(state)["version"] > version, timeout=30, what="the table pushed again")
    assert serving_route(state, key)["port"] == port
    found = await read_slice(cluster, "chat")
    assert [(p.name, p.port) for p in found.ports] == [("http", port)] and found.endpoints[0].conditions.ready

    # Deleted for good: the port is released.
    await cluster.delete_isvc("chat")
    await wait_for(lambda: key not in stable_ports(state), timeout=30, what="the port released")


async def _took_over(agent, pid: int) -> bool:
    rows = await agent.services()
    return bool(rows) and rows[0]["pid"] == pid and rows[0]["state"] == "Ready"


async def test_the_slice_stays_ready_on_its_port_across_a_respawn_and_a_crash(mac):
    cluster, ns, make_agent, state = mac
    agent = make_agent()
    await agent.start()
    key = f"{cluster.ns}/steady"
    await cluster.create_isvc("steady", "tiny", contextSize=256)
    await cluster.wait_phase("steady", "Ready")
    await wait_for(lambda: serving_route(state, key), timeout=30, what="the route serving")
    port = stable_ports(state)[key]
    seen_not_ready: list[str] = []

    async def sample_until(done) -> object:
        found = await read_slice(cluster, "steady")
        if not (found and found.endpoints and found.endpoints[0].conditions.ready
                and [p.port for p in found.ports] == [port]):
            seen_not_ready.append(repr(found.endpoints if found else None))
        return await done()

    old_pid = (await agent.services())[0]["pid"]
    await cluster.patch_isvc("steady", {"contextSize": 512})  # a respawn for a spec change
    await wait_for(lambda: sample_until(lambda: _ready_other_than(agent, old_pid)), timeout=60, interval=0.02,
                   what="respawned")
    pid = (await agent.services())[0]["pid"]
    os.kill(pid, signal.SIGKILL)  # a crash: the supervisor restarts it
    await wait_for(lambda: sample_until(lambda: _ready_other_than(agent, pid)), timeout=60, interval=0.02,
                   what="restarted")
    assert seen_not_ready == []  # the front door holds requests meanwhile; the slice never flapped
    engine_port = (await agent.services())[0]["port"]
    route = await wait_for(lambda: _route_upstream(state, key, engine_port), timeout=30,
                           what="the table follows the engine's new port")
    assert route["port"] == port


async def _ready_other_than(agent, pid: int) -> bool:
    rows = await agent.services()
    return bool(rows) and rows[0]["pid"] not in (None, pid) and rows[0]["state"] == "Ready"


def _route_upstream(state: Path, key: str, engine_port: int) -> dict | None:
    route = serving_route(state, key)
    return route if route and route["upstream"] == f"127.0.0.1:{engine_port}" else None
