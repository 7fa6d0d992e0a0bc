"""The agent side of the front door end to end (on by default), real kube-apiserver and real
llama-server, the "Mac" a network namespace as in test_registration.py.

The front door is the real one (`metal-agent front-door`, spawned by the agent): the slice on
the stable port, the engine on loopback, the table the front door is handed, a cluster client's
request through the stable port, the port surviving an agent restart, and the front door
process adopted (not restarted) across one, and the engines of an agent without the front door
moved behind it one at a time under load. The front door runs in `open` access mode here:
who may call is tested in test_front_door_access.py and tests/security/.
"""

from __future__ import annotations

import asyncio
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
from metal_agent.adapters.process.pause_point import AFTER_FRONT_DOOR_EXEC, BEFORE_FIRST_MOVE, ENV as PAUSE_ENV
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
    args = ("--front-door-access", "open", "--heartbeat-interval", "1")  # the front door: on by default
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
    assert pushed_table(state)["listen_host"] == ns.inner_ip and pushed_table(state)["client_port"] == agent.client_port
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


async def test_an_older_agents_engines_move_behind_the_front_door_one_at_a_time_under_load(mac):
    """The upgrade path: an agent without the front door (an older release, or --no-front-door) left
    its engines on the Mac's address, open to the LAN. The next agent takes them over and routes them
    through the front door where they listen (no model reloaded to get there), then moves each onto
    127.0.0.1 once its route is quiet, one service at a time, the front door holding requests
    meanwhile: not one request fails."""
    cluster, ns, make_agent, state = mac
    old = make_agent("--no-front-door")
    await old.start()
    names = ("one", "two")
    for name in names:
        await cluster.create_isvc(name, "tiny", contextSize=256)
    for name in names:
        await cluster.wait_phase(name, "Ready")
    before = {row["service"]: row for row in await old.services()}
    for row in before.values():
        argv = psutil.Process(row["pid"]).cmdline()
        assert argv[argv.index("--host") + 1] == ns.inner_ip  # open to whoever routes to the Mac
    await old.stop()  # its engines are left for the next agent, as after any agent upgrade
    for name in names:  # the slices the older agent wrote name the engines' own ports
        found = await read_slice(cluster, name)
        assert [p.port for p in found.ports] == [before[f"{cluster.ns}/{name}"]["port"]]

    new = make_agent()
    new.options.env = {PAUSE_ENV: BEFORE_FIRST_MOVE}
    await new.start(wait_ready=False)
    agent_proc = psutil.Process(new.process.pid)
    await wait_for(lambda: agent_proc.status() == psutil.STATUS_STOPPED, timeout=60,
                   what="the new agent at its first move", on_timeout=new.log_text)
    # Taken over, not respawned: the same engines, served through the front door where they listen
    # (the one about to move certainly; the other may still be in its first health check).
    ports = stable_ports(state)
    routes = {r["key"]: r for r in pushed_table(state)["routes"]}
    assert set(routes) == set(before) and any(r["state"] == "serving" for r in routes.values())
    for key, row in before.items():
        assert live_pid(row["pid"]) and routes[key]["port"] == ports[key]
        if routes[key]["state"] == "serving":
            assert routes[key]["upstream"] == f"{ns.inner_ip}:{row['port']}"

    load = {key: Load(f"http://{ns.inner_ip}:{ports[key]}", key.split("/")[1]) for key in before}
    tasks = [asyncio.create_task(one.run()) for one in load.values()]
    try:
        served = [k for k, r in routes.items() if r["state"] == "serving"]
        await wait_for(lambda: all(load[k].ok >= 5 for k in served), timeout=30, what="load through the old engines")
        os.kill(new.process.pid, signal.SIGCONT)
        await wait_for(lambda: _all_moved(new, before), timeout=120, interval=0.05,
                       what="both engines on 127.0.0.1", on_timeout=new.log_text)
        marks = {key: one.ok for key, one in load.items()}
        await wait_for(lambda: all(one.ok >= marks[k] + 5 for k, one in load.items()), timeout=30,
                       what="load served by the moved engines")
    finally:
        for one in load.values():
            one.stop = True
        await asyncio.gather(*tasks)
    assert [one.failures for one in load.values()] == [[], []]
    for row in await new.services():
        argv = psutil.Process(row["pid"]).cmdline()
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        found = await read_slice(cluster, row["service"].split("/")[1])  # the slice: the front door's port
        assert [p.port for p in found.ports] == [ports[row["service"]]] and found.endpoints[0].conditions.ready
    # One at a time: the second is moved only once the first is serving again.
    order = _log_order(new.log_text(), before)
    first, second = sorted(before, key=lambda key: order[("move", key)])
    assert order[("move", first)] < order[("ready", first)] < order[("move", second)] < order[("ready", second)]
    reasons = [e.reason for e in await cluster.events(first.split("/")[1])]
    assert "MovingBehindFrontDoor" in reasons


class Load:
    """One client sending short completions back to back through the front door."""

    def __init__(self, base: str, model: str) -> None:
        self.base, self.model = base, model
        self.ok = 0
        self.failures: list[str] = []
        self.stop = False

    async def run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            while not self.stop:
                try:
                    async with http.post(f"{self.base}/v1/chat/completions", json=body) as resp:
                        text = await resp.text()
                        if resp.status == 200:
                            self.ok += 1
                        else:
                            self.failures.append(f"{resp.status} {text[:200]}")
                except (aiohttp.ClientError, OSError) as err:
                    self.failures.append(repr(err))


def live_pid(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _all_moved(agent, before: dict) -> bool:
    rows = await agent.services()
    return len(rows) == len(before) and all(
        row["state"] == "Ready" and row["pid"] != before[row["service"]]["pid"] for row in rows)


def _log_order(text: str, keys) -> dict[tuple[str, str], int]:
    """Line numbers of each service's move and of its new engine's readiness, in the agent's log."""
    found: dict[tuple[str, str], int] = {}
    for number, line in enumerate(text.splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        key, event = entry.get("service"), entry.get("event")
        if key not in keys:
            continue
        if event == "moving the engine onto 127.0.0.1 behind the front door":
            found.setdefault(("move", key), number)
        elif event == "llama-server ready" and ("move", key) in found:
            found.setdefault(("ready", key), number)
    return found


def front_doors_of(state: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "front-door" in argv and str(state) in argv and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


async def test_an_agent_killed_between_the_front_doors_exec_and_its_record_leaves_no_stray_one(mac):
    """The record is written before the exec: an agent killed in that window (held open by a pause
    point, so the test hits it every time) leaves a front door the next agent adopts by its command
    line, not a second one beside an unrecorded first."""
    cluster, ns, make_agent, state = mac
    first = make_agent()
    first.options.env = {PAUSE_ENV: AFTER_FRONT_DOOR_EXEC}
    await first.start(wait_ready=False)
    agent_proc = psutil.Process(first.process.pid)
    await wait_for(lambda: agent_proc.status() == psutil.STATUS_STOPPED, timeout=60,
                   what="the agent right after the front door's exec", on_timeout=first.log_text)
    pending = read_record(state / RECORD_FILE)
    assert pending is not None and pending.pid == 0  # written before the exec, without a pid
    [door] = front_doors_of(state)
    first.kill()

    again = make_agent()
    await again.start()
    assert [p.pid for p in front_doors_of(state)] == [door.pid]  # adopted: no second front door
    record = read_record(state / RECORD_FILE)
    assert record.pid == door.pid and live_process(record)
    assert "adopted the running front door" in again.log_text()
    await cluster.create_isvc("after", "tiny", contextSize=256)
    await cluster.wait_phase("after", "Ready")
    key = f"{cluster.ns}/after"
    port = (await wait_for(lambda: serving_route(state, key), timeout=30, what="the route serving"))["port"]
    async with aiohttp.ClientSession() as http:
        body = {"model": "after", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        async with http.post(f"http://{ns.inner_ip}:{port}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()


async def test_a_services_unusable_api_key_secret_is_a_condition_and_an_event_until_fixed(mac):
    """No key can work while the named Secret is missing: the user sees it on the InferenceService
    (condition MetalApiKeyReady=False, an Event naming the Secret, never a key), and the condition
    turns True once the Secret is there; the model serves meanwhile (loopback needs no key)."""
    from metal_agent.adapters.kube.api_keys import ANNOTATION, NOT_FOUND
    from tests.support.front_door_grants import grant_key_reader

    cluster, ns, make_agent, state = mac
    key_value = "guarded-key-" + "7" * 24
    await grant_key_reader(cluster.api, cluster.ns, ["guard-keys"])
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("guarded", "tiny", contextSize=256)
    await cluster.custom.patch_namespaced_custom_object(
        "inference.llmkube.dev", "v1alpha1", cluster.ns, "inferenceservices", "guarded",
        {"metadata": {"annotations": {ANNOTATION: "guard-keys"}}}, _content_type="application/merge-patch+json")
    await cluster.wait_phase("guarded", "Ready")

    async def condition_is(status: str):
        found = await cluster.condition("guarded", "MetalApiKeyReady")
        return found if found and found["status"] == status else None

    bad = await wait_for(lambda: condition_is("False"), timeout=30, what="MetalApiKeyReady=False")
    assert bad["reason"] == NOT_FOUND and f"Secret {cluster.ns}/guard-keys" in bad["message"]
    await cluster.wait_event("guarded", NOT_FOUND)
    [event] = [e for e in await cluster.events("guarded") if e.reason == NOT_FOUND]
    assert event.type == "Warning" and f"{cluster.ns}/guard-keys" in event.message

    await cluster.core.create_namespaced_secret(cluster.ns, {
        "metadata": {"name": "guard-keys"}, "stringData": {"api-key": key_value}})
    good = await wait_for(lambda: condition_is("True"), timeout=30, what="MetalApiKeyReady=True")
    assert good["reason"] == "ApiKeysLoaded"
    await cluster.wait_event("guarded", "ApiKeySecretReadable")
    texts = [str(c) for c in (await cluster.status("guarded"))["conditions"]]
    texts += [e.message for e in await cluster.events("guarded")]
    assert not any(key_value in text for text in texts)  # the key itself is never shown


async def test_a_moved_address_is_followed_by_the_front_door_without_a_respawn(mac):
    """The Mac changes networks: the slice names the new address on the same stable port, the
    front door listens there, and the engine, on loopback, is not restarted (no model reload)."""
    cluster, ns, make_agent, state = mac
    agent = make_agent("--address-check-interval", "0.3", detect_host=True)
    await agent.start()
    await cluster.create_isvc("roam", "tiny", contextSize=256)
    await cluster.wait_phase("roam", "Ready")
    key = f"{cluster.ns}/roam"
    port = (await wait_for(lambda: serving_route(state, key), timeout=30, what="the route serving"))["port"]
    pid = (await agent.services())[0]["pid"]

    moved = await netns.move_address(ns)

    async def registered_there():
        found = await read_slice(cluster, "roam")
        ok = found and found.endpoints and found.endpoints[0].addresses == [moved.inner_ip]
        return found if ok and found.endpoints[0].conditions.ready else None
    found = await wait_for(registered_there, timeout=30, what="the slice on the new address, ready")
    assert [p.port for p in found.ports] == [port]  # the stable port stays
    await wait_for(lambda: pushed_table(state).get("listen_host") == moved.inner_ip, timeout=30,
                   what="the front door told the new address")
    body = {"model": "roam", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    async def answered() -> bool:
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://{moved.inner_ip}:{port}/v1/chat/completions", json=body,
                                     timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False  # its listener is (re)opened just after the table is kept
    await wait_for(answered, timeout=30, what="a request on the new address")
    rows = await agent.services()
    assert rows[0]["pid"] == pid and rows[0]["state"] == "Ready"  # not respawned: it listens on loopback
