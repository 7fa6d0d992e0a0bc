"""A fleet (issue 14, `metal-agent run --fleet`) beside LLMKube's real controller.

The Macs are tests/support/fleet.py's (network namespaces, short leases) on the
plane where LLMKube's manager runs (tests/support/llmkube.py). LLMKube's
controller counts readyReplicas across every EndpointSlice of the Service and
judges heartbeats by the freshest one; these tests assert what it makes of
several Macs serving one service, one of them losing power, and one draining:
its phase and readyReplicas, and that exactly one Mac writes our status fields,
and only when something changed.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support import netns
from tests.support.agent import kill_recorded_processes
from tests.support.coexistence import WRITES, Changes, agent_fields, freshest_heartbeat, heartbeats_seen, llmkube_ready
from tests.support.fleet import (START_TIMEOUT, Mac, ReadyWatcher, answers, cli_in, fleet_of, ready_endpoints,
                                 ready_on)
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

# The status fields the agent may own in shared mode (docs/llmkube-compat.md): never LLMKube's
# phase, readyReplicas or endpoint.
AGENT_OWNED = {".", "f:conditions", "f:acceleration", "f:schedulingStatus", "f:schedulingMessage", "f:waitingFor"}


@pytest.fixture
async def cluster(llmkube_admin_api, llmkube_namespace, llmkube_tiny_model):
    cluster = Cluster(llmkube_admin_api, llmkube_namespace)
    await cluster.create_model("tiny", f"file://{llmkube_tiny_model}")  # under the manager's allowed root
    return cluster


async def settled_on(cluster: Cluster, name: str, macs: list[Mac], count: int | None = None) -> list[Mac] | None:
    """LLMKube says Ready with every replica ready and no agent-absent leftover, and our
    FleetPlacement names `count` ready Macs among `macs` (all of them without `count`): those Macs."""
    count = len(macs) if count is None else count
    status = await llmkube_ready(cluster, name)
    if not status or status.get("readyReplicas") != count or status.get("schedulingStatus"):
        return None
    placement = next((c for c in status["conditions"] if c["type"] == "FleetPlacement"), {})
    named = [m for m in macs if f"on {m.name} (ready)" in placement.get("message", "")]
    ok = placement.get("status") == "True" and len(named) == count == placement["message"].count("(ready)")
    return named if ok else None


async def speaker(macs: list[Mac], key: str) -> Mac:
    """The Mac holding replica #0: the one that speaks for the service's status."""
    for mac in macs:
        if f"{key}#0" in await mac.holds():
            return mac
    raise AssertionError(f"nobody holds {key}#0")


async def writes(macs: list[Mac]) -> dict[str, float]:
    return {m.name: await m.agent.metric(WRITES) for m in macs}


async def idle_for(cluster: Cluster, name: str, macs: list[Mac], heartbeats: int) -> Changes:
    """Watch the service while `heartbeats` heartbeats (1 s apart) pass; the agents must not write."""
    before = await writes(macs)
    when = agent_fields(await cluster.isvc(name))[0]
    async with Changes(cluster, name) as changes:
        first = await freshest_heartbeat(cluster, name)
        await wait_for(lambda: heartbeats_seen(cluster, name, first, heartbeats, every=1), timeout=60,
                       what=f"{heartbeats} heartbeats")
    assert await writes(macs) == before, "an agent wrote status while idle"
    assert agent_fields(await cluster.isvc(name))[0] == when
    assert set(changes.phases) <= {"Ready"}, f"phase flipped while idle: {changes.phases}"
    return changes


async def test_two_replicas_beside_llmkube_then_the_speaking_mac_loses_power(
        llmkube_plane, llama_server_bin, tmp_path, llmkube_namespace, cluster):
    key = f"{llmkube_namespace}/pair"
    async with fleet_of(llmkube_plane.control_plane, llama_server_bin, tmp_path, llmkube_namespace,
                        {"a": {}, "b": {}, "c": {}}) as macs:
        await asyncio.gather(*(m.agent.start() for m in macs))
        await cluster.create_isvc("pair", "tiny", contextSize=256, replicas=2)
        async with Changes(cluster, "pair") as starting:
            serving = await wait_for(lambda: ready_on(cluster, "pair", macs, count=2), timeout=START_TIMEOUT,
                                     what="two replicas ready", on_timeout=llmkube_plane.manager_tail)
            await wait_for(lambda: settled_on(cluster, "pair", serving), timeout=START_TIMEOUT,
                           what="LLMKube: Ready with 2 ready replicas, FleetPlacement names both, no leftover")
        assert max(starting.ready_replicas) <= 2, starting.ready_replicas
        assert_waiting_left_alone(starting)
        for address, port in await ready_endpoints(cluster, "pair"):
            assert await answers(address, port)

        # Only our own fields carry our name; one Mac speaks: the holder of replica #0.
        owned = agent_fields(await cluster.isvc("pair"))[1]
        assert owned and owned <= AGENT_OWNED, owned
        first = await speaker(macs, key)
        assert first in serving

        changes = await idle_for(cluster, "pair", macs, heartbeats=6)
        # LLMKube answers each Mac's heartbeat with at most two status updates (two when its
        # second reconcile crosses a second of lastUpdated): 2 Macs x ~7 heartbeats.
        assert changes.count <= 2 * 2 * 7 + 1, f"{changes.count} changes: the writers do not settle"

        # A change every serving Mac sees (a third replica, on the spare): only the speaker writes it.
        before = await writes(macs)
        async with Changes(cluster, "pair") as up:
            await cluster.patch_isvc("pair", {"replicas": 3})
            await wait_for(lambda: settled_on(cluster, "pair", macs), timeout=START_TIMEOUT,
                           what="LLMKube: Ready with 3 ready replicas")
        assert await speaker(macs, key) is first
        after = await writes(macs)
        assert after[first.name] > before[first.name], "the speaker did not write the new placement"
        assert {n: after[n] - before[n] for n in after if n != first.name} == \
            {m.name: 0 for m in macs if m is not first}, "a Mac that does not speak for the service wrote its status"
        assert_placement_counts(up, 3)
        async with Changes(cluster, "pair") as down:
            await cluster.patch_isvc("pair", {"replicas": 2})
            serving = await wait_for(lambda: settled_on(cluster, "pair", macs, count=2), timeout=START_TIMEOUT,
                                     what="LLMKube: Ready with 2 ready replicas again")
        assert_placement_counts(down, 2)
        (spare,) = [m for m in macs if m not in serving]
        assert first in serving
        await wait_for(lambda: _idle(spare), timeout=30, what="the spare to stop its llama-server")

        # The speaker's agent restarts (an upgrade): it adopts its llama-server; LLMKube stays Ready.
        pid = (await first.agent.services())[0]["pid"]
        others = [m for m in macs if m is not first]
        before = await writes(others)
        async with Changes(cluster, "pair") as restart, ReadyWatcher(cluster, "pair") as watcher:
            await first.agent.stop()
            await first.agent.start()
            await wait_for(lambda: _adopted(first, pid), timeout=30, what="the speaker to adopt its llama-server")
            await wait_for(lambda: settled_on(cluster, "pair", serving), timeout=30, what="still Ready")
        assert first.agent.starts == 2 and await first.agent.metric(WRITES) == 0, "the restarted speaker rewrote status"
        assert set(restart.phases) <= {"Ready"} and set(restart.ready_replicas) <= {2}, restart.phases
        assert watcher.most == 2 and watcher.zero_s == 0
        assert await writes(others) == before

        # The speaking Mac loses power: its agent and llama-server die, its network goes.
        async with ReadyWatcher(cluster, "pair") as watcher, Changes(cluster, "pair") as failover:
            first.agent.kill()
            kill_recorded_processes(first.workdir / "state")
            await netns._ip("link", "set", first.ns.outer_if, "down")
            survivors = [m for m in serving if m is not first] + [spare]
            await wait_for(lambda: settled_on(cluster, "pair", survivors), timeout=START_TIMEOUT,
                           what="LLMKube: Ready again with 2 ready replicas on the survivors, no leftover",
                           on_timeout=llmkube_plane.manager_tail)
            assert watcher.most <= 2, "more ready endpoints than replicas"
        assert max(failover.ready_replicas) <= 2, f"LLMKube counted more than 2: {failover.ready_replicas}"
        assert min(failover.ready_replicas) < 2 and "Progressing" in failover.phases, \
            f"LLMKube never reported the drop: {failover.phases} {failover.ready_replicas}"
        assert await speaker(survivors, key) in survivors
        now_on = await ready_on(cluster, "pair", macs, count=2)
        assert now_on and sorted(m.name for m in now_on) == sorted(m.name for m in survivors)
        for address, port in await ready_endpoints(cluster, "pair"):
            assert await answers(address, port)
        owned = agent_fields(await cluster.isvc("pair"))[1]
        assert owned and owned <= AGENT_OWNED, owned

        # The new speaker and the other survivor settle: no flip-flop between them.
        changes = await idle_for(cluster, "pair", survivors, heartbeats=4)
        assert changes.count <= 2 * 2 * 5 + 1, f"{changes.count} changes: the writers do not settle"


async def test_drain_then_power_loss_beside_llmkube(llmkube_plane, llama_server_bin, tmp_path, llmkube_namespace,
                                                   cluster):
    """One replica. A drain moves it make-before-break: LLMKube never sees it without a ready
    replica (it may say Progressing while both are ready, as for a Deployment's surge). Then the
    Mac serving it loses power: LLMKube, with no ready replica, writes that it waits for the
    agent; the Mac that takes the replica over clears that once LLMKube says Ready again."""
    async with fleet_of(llmkube_plane.control_plane, llama_server_bin, tmp_path, llmkube_namespace,
                        {"a": {}, "b": {}}) as macs:
        a, b = macs
        await a.agent.start()
        await cluster.create_isvc("moving", "tiny", contextSize=256)
        await wait_for(lambda: settled_on(cluster, "moving", [a]), timeout=START_TIMEOUT, what="Ready on a")
        await b.agent.start()
        await wait_for(lambda: _members_see(a, b), timeout=30, what="a to see b alive")
        async with Changes(cluster, "moving") as drain, ReadyWatcher(cluster, "moving", limit=1) as watcher:
            code, out = await cli_in(a, "drain")
            assert code == 0, out
            await wait_for(lambda: settled_on(cluster, "moving", [b]), timeout=START_TIMEOUT,
                           what="LLMKube: Ready on b, no leftover")
            await wait_for(lambda: _idle(a), timeout=30, what="a to stop its llama-server")
        assert watcher.zero_s == 0 and watcher.zero_since is None, "the service had no ready endpoint"
        assert drain.ready_replicas and min(drain.ready_replicas) >= 1, f"no ready replica: {drain.ready_replicas}"
        assert max(drain.ready_replicas) <= 2 and set(drain.phases) <= {"Ready", "Progressing"}, drain.phases
        assert not set(drain.scheduling) - {""}, f"LLMKube waited for the agent: {drain.scheduling}"
        await idle_for(cluster, "moving", macs, heartbeats=3)

        code, out = await cli_in(a, "uncordon")
        assert code == 0, out
        async with Changes(cluster, "moving") as failover:
            b.agent.kill()
            kill_recorded_processes(b.workdir / "state")
            await netns._ip("link", "set", b.ns.outer_if, "down")
            await wait_for(lambda: settled_on(cluster, "moving", [a]), timeout=START_TIMEOUT,
                           what="LLMKube: Ready on a again, its agent-absent leftover cleared",
                           on_timeout=llmkube_plane.manager_tail)
        assert "WaitingForMetalAgent" in failover.scheduling, failover.scheduling
        assert_waiting_left_alone(failover)
        assert max(failover.ready_replicas) <= 1
        await idle_for(cluster, "moving", [a], heartbeats=3)


def assert_placement_counts(changes: Changes, replicas: int) -> None:
    """Every FleetPlacement written for the scaled spec counts with its replica count: never a
    replica beyond it, never "unplaced" once it is placed (no flip on the way)."""
    generation = max(c.get("observedGeneration", 0) for s in changes.statuses for c in s.get("conditions") or [])
    said = [c for s in changes.statuses for c in s.get("conditions") or []
            if c["type"] == "FleetPlacement" and c.get("observedGeneration") == generation]
    assert said, "no FleetPlacement for the scaled spec"
    assert not [c for c in said if f"replica {replicas} on" in c["message"]], said
    placed = [c["status"] for c in said]
    assert "False" not in placed[placed.index("True"):], f"FleetPlacement flipped: {said}"


def assert_waiting_left_alone(changes: Changes) -> None:
    """While no Mac serves yet LLMKube's "WaitingForMetalAgent" is true: a write of ours then
    (a model loading) must leave it alone; blanking it made LLMKube write it straight back."""
    if "WaitingForMetalAgent" not in changes.scheduling:
        return
    seen = changes.statuses[changes.scheduling.index("WaitingForMetalAgent"):]
    blanked = [s.get("schedulingStatus") for s in seen if s.get("phase") != "Ready" and not _process_ready(s)
               and s.get("schedulingStatus") != "WaitingForMetalAgent"]
    assert not blanked, f"the agent blanked LLMKube's WaitingForMetalAgent while loading: {changes.scheduling}"


def _process_ready(status: dict) -> bool:
    return any(c["type"] == "MetalProcessReady" and c["status"] == "True" for c in status.get("conditions") or [])


async def _members_see(mac: Mac, other: Mac) -> bool:
    view = await mac.fleet()
    return any(m["member"] == other.name for m in view["members"])


async def _adopted(mac: Mac, pid: int) -> bool:
    rows = await mac.agent.services()
    return bool(rows) and rows[0]["pid"] == pid and rows[0]["state"] == "Ready" and rows[0]["adopted"]


async def _idle(mac: Mac) -> bool:
    return not await mac.agent.services()
