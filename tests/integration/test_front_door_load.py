"""Issue 21, item 5, end to end: under a steady request load through the front door, a respawn for a
spec change (drained first), a crash restart (a request the engine took down with it is sent
again) and an agent restart each cost no request.

The "Mac" is a network namespace running the real agent (`--front-door`), which spawns the real front
door and the real llama-server; four client loops in the root namespace play cluster clients calling
the service's stable port, a fresh connection per request, from before the first event to after the
last. Each window (event -> the engine or agent ready again) must have had requests open in it, so
"no failure" is about requests that were really held, not about a quiet moment.

Runs in `open` access mode: who may call is test_front_door_netns.py's subject.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from metal_agent.adapters.process.front_door_process import RECORD_FILE, read_record
from metal_agent.adapters.process.records import live_process
from tests.support import netns
from tests.support.agent import agents_in_netns
from tests.support.isvc import Cluster
from tests.support.steady_load import SteadyLoad
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


def _stable_port(state, key: str) -> int | None:
    import json

    path = state / "front-door-ports.json"
    return json.loads(path.read_text())["ports"].get(key) if path.exists() else None


async def _slice_ready(cluster: Cluster, name: str, port: int) -> bool:
    from kubernetes_asyncio import client

    found = await client.DiscoveryV1Api(cluster.api).list_namespaced_endpoint_slice(
        cluster.ns, label_selector=f"kubernetes.io/service-name={name}")
    return any(s.endpoints and s.endpoints[0].conditions.ready and [p.port for p in s.ports or []] == [port]
               for s in found.items)


async def _serving_on(agent, other_than: int | None = None) -> int | None:
    """The engine's pid once the agent says Ready (and it is not `other_than`)."""
    rows = await agent.services()
    if rows and rows[0]["state"] == "Ready" and rows[0]["pid"] not in (None, other_than):
        return rows[0]["pid"]
    return None


@pytest.mark.parametrize("agent_exit", ["stop", "kill"])  # an upgrade (SIGTERM), and the agent crashing
async def test_a_steady_load_loses_nothing_across_a_respawn_a_crash_and_an_agent_restart(mac, agent_exit):
    cluster, ns, make_agent, state = mac
    agent = make_agent()
    await agent.start()
    key = f"{cluster.ns}/steady"
    await cluster.create_isvc("steady", "tiny", contextSize=256, parallelSlots=2)
    # What a cluster client follows: the load starts the moment the slice says ready (behind the front
    # door, while the engine may still be starting: the front door holds), so a slice that said so
    # before the front door listened on the port would fail the first requests.
    port = await wait_for(lambda: _stable_port(state, key), timeout=60, interval=0.005, what="the stable port")
    await wait_for(lambda: _slice_ready(cluster, "steady", port), timeout=60, interval=0.005, what="the slice ready")
    windows: dict[str, tuple[float, float]] = {}

    async with SteadyLoad(f"http://{ns.inner_ip}:{port}/v1/chat/completions", "steady", loops=4) as load:
        await wait_for(load.progressed(0.0, each=3), timeout=60, what="the load flowing",
                       on_timeout=lambda: repr(load.outcomes[-4:]))
        pid = await wait_for(lambda: _serving_on(agent), timeout=30, what="the engine ready")

        began = time.monotonic()
        await cluster.patch_isvc("steady", {"contextSize": 512})  # a respawn for a spec change
        pid = await wait_for(lambda: _serving_on(agent, other_than=pid), timeout=90, what="respawned")
        windows["respawn"] = (began, time.monotonic())
        await wait_for(load.progressed(windows["respawn"][1]), timeout=60, what="the load after the respawn")

        began = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # a crash: the supervisor restarts it
        pid = await wait_for(lambda: _serving_on(agent, other_than=pid), timeout=90, what="restarted")
        windows["crash"] = (began, time.monotonic())
        await wait_for(load.progressed(windows["crash"][1]), timeout=60, what="the load after the crash")

        began = time.monotonic()
        if agent_exit == "stop":
            await agent.stop()  # an agent restart (an upgrade): the front door and the engine stay
        else:
            agent.kill()  # SIGKILL, nothing tidied up
            await agent.process.proc.wait()
        again = make_agent()
        await again.start()
        await wait_for(lambda: _serving_on(again), timeout=90, what="the engine adopted")
        windows["agent restart"] = (began, time.monotonic())
        await wait_for(load.progressed(windows["agent restart"][1]), timeout=60, what="the load after the restart")

    assert load.failed() == [], _failures(load, windows)
    for name, (start, end) in windows.items():
        held = load.overlapping(start, end)
        assert len(held) >= 4, f"{name}: only {len(held)} requests were open during it"
        print(f"{name}: {end - start:.2f} s, {len(held)} requests open in it, the longest "
              f"{load.longest_ms(start, end):.0f} ms")  # the figures in the notes (pytest -s)
    assert (await _serving_on(again)) == pid  # adopted, not restarted
    # Drained before the stop (app/front_door_drain.py): nobody waited out the stop's 10 s grace, as
    # requests sent to an engine that had begun to exit did before (they were answered only after
    # its SIGKILL, by the next engine).
    assert load.longest_ms(*windows["respawn"]) < 10_000


def _failures(load: SteadyLoad, windows: dict[str, tuple[float, float]]) -> str:
    """Which window each failure fell in, and the first of each kind."""
    lines = [f"{len(load.failed())} of {len(load.outcomes)} requests failed"]
    for name, (start, end) in [*windows.items(), ("outside every window", (0.0, float("inf")))]:
        inside = [o for o in load.failed() if o.start <= end and o.end >= start]
        if inside:
            lines.append(f"{name}: {len(inside)}, first {inside[0].end - start:+.3f} s in: {inside[0].status} "
                         f"{inside[0].error[:200]}")
    return "\n".join(lines)
