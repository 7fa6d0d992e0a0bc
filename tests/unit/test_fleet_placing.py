"""Placement on its own: the fleet's loop ticked by hand with a test clock, its Lease writes
against fakes of the ports it is handed (tests/support/fleet_fakes.py). No sleeps: a tick is
a call, and the writes it starts are awaited (`settle`)."""

from __future__ import annotations

import asyncio

import pytest

from metal_agent.core.leases import parse_replica, replica_lease_name
from metal_agent.fleet.placer import UNSCHEDULABLE
from metal_agent.fleet.wiring import FleetParts
from tests.support.fleet_fakes import Fakes, build
from tests.support.manifests import isvc_doc, model_doc

KEY = "default/chat"


async def settle(parts: FleetParts) -> None:
    """Wait for every renewal and Lease write the ticks started (and those they started)."""
    while running := [t for tasks in (parts.loop.renewal, parts.placer.writes)
                      for t in map(tasks.current, tasks.running()) if t is not None]:
        await asyncio.gather(*running)


async def tick(parts: FleetParts, fakes: Fakes, seconds: float = 0.0) -> None:
    """Time passes, the watch catches up, one round of the loop, and its writes finish."""
    fakes.clock.advance(seconds)
    fakes.leases.deliver(parts.gate.on_lease_change)
    parts.loop.tick()
    await settle(parts)
    fakes.leases.deliver(parts.gate.on_lease_change)


async def run_for(parts: FleetParts, fakes: Fakes, seconds: float, step: float = 1.0) -> None:
    """Tick every `step` seconds for `seconds` (our own Lease renewed on the way, as in the agent)."""
    for _ in range(round(seconds / step)):
        await tick(parts, fakes, step)


def holder(fakes: Fakes, index: int = 0) -> str | None:
    lease = fakes.leases.leases.get(replica_lease_name(KEY, index))
    return parse_replica(lease).holder if lease else None


@pytest.fixture
def fakes() -> Fakes:
    fakes = Fakes()
    fakes.models["default/tiny"] = model_doc()
    fakes.synced.set()
    return fakes


async def test_a_new_service_is_taken_after_one_bid_step_and_said_in_an_event(fakes, tmp_path):
    parts = build(fakes, tmp_path, bid_step=2.0)
    await tick(parts, fakes)  # renews: ready
    fakes.isvcs[KEY] = isvc_doc()
    await tick(parts, fakes)
    await tick(parts, fakes, 1.9)
    assert holder(fakes) is None  # a new replica: even the first in line waits one step
    await tick(parts, fakes, 0.2)
    assert holder(fakes) == "a" and parts.gate.serves(KEY) and KEY in fakes.told
    [(name, reason, message)] = fakes.events.emitted
    assert (name, reason) == ("chat", "Placed") and message.startswith("replica 0 placed on a (model to download")


async def test_a_service_no_mac_may_take_is_unplaced_and_nobody_bids(fakes, tmp_path):
    parts = build(fakes, tmp_path, labels={"size": "small"})
    await tick(parts, fakes)
    fakes.isvcs[KEY] = isvc_doc(nodeSelector={"size": "huge"})
    await tick(parts, fakes)
    await run_for(parts, fakes, 60)
    blocker = parts.gate.unplaced(KEY)
    assert blocker.reason == UNSCHEDULABLE and blocker.phase == "Pending"
    assert "does not match the nodeSelector/affinity" in blocker.message
    assert parts.gate.speaks_for(KEY) and not parts.gate.serves(KEY) and KEY in fakes.told
    assert holder(fakes) is None and fakes.events.emitted == []


async def test_a_silent_macs_replica_is_marked_not_ready_then_taken_over(fakes, tmp_path):
    parts = build(fakes, tmp_path)
    fakes.isvcs[KEY] = isvc_doc()
    fakes.leases.renew_other("b")
    fakes.leases.hold(KEY, 0, "b")
    await run_for(parts, fakes, 30)
    assert holder(fakes) == "b" and fakes.slices.marked == []
    fakes.leases.renew_other("b")  # b is alive as long as its Lease changes
    await run_for(parts, fakes, 30)
    assert holder(fakes) == "b" and fakes.slices.marked == []
    await run_for(parts, fakes, 15)  # b silent for longer than its Lease (40 s)
    assert fakes.slices.marked.count("b") == 2  # marked when noticed, and again just before the take-over
    assert holder(fakes) == "a"
    [(_, reason, message)] = fakes.events.emitted
    assert reason == "Moved" and message.startswith("replica 0 moved from b (stopped renewing its lease) to a")


async def test_a_replica_of_a_deleted_service_is_released_by_its_holder(fakes, tmp_path):
    parts = build(fakes, tmp_path)
    fakes.leases.hold(KEY, 0, "a")
    await tick(parts, fakes)
    assert parts.gate.serves(KEY)
    await tick(parts, fakes, 1)
    assert replica_lease_name(KEY, 0) not in fakes.leases.leases and not parts.gate.serves(KEY)


async def test_a_replica_the_memory_admission_refused_is_handed_back_and_the_refusal_published(fakes, tmp_path):
    parts = build(fakes, tmp_path)
    fakes.isvcs[KEY] = isvc_doc()
    fakes.leases.hold(KEY, 0, "a")
    await tick(parts, fakes)
    fakes.waiting[KEY] = "InsufficientMemory: needs 40 GiB, 8 GiB free"
    await tick(parts, fakes, 1)
    assert replica_lease_name(KEY, 0) not in fakes.leases.leases
    renewals = fakes.leases.writes.count("member.a")
    await tick(parts, fakes, 1)  # news for the others: renewed at once, not after the 10 s interval
    assert fakes.leases.writes.count("member.a") == renewals + 1
    assert parts.membership.my_info().member.unfit == {KEY: "InsufficientMemory: needs 40 GiB, 8 GiB free"}
    assert "needs 40 GiB" in str(fakes.leases.leases["member.a"])


async def test_the_loop_ends_cancelled_with_nothing_left_running(fakes, tmp_path):
    parts = build(fakes, tmp_path)
    fakes.leases.down = True
    run = asyncio.create_task(parts.loop.run())
    while parts.membership.renewals["failed"] == 0:
        await asyncio.sleep(0)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert parts.loop.renewal.running() == [] and parts.placer.writes.running() == []
