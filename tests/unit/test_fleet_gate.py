"""The gate the controller asks ("is this service ours?"), on its own: the static allowlist,
and the fleet's gate built with only what it is handed (membership over fakes of the ports,
tests/support/fleet_fakes.py; no placer, no loop), its time driven by a test clock. The lease
watch is delivered when the test says so."""

from __future__ import annotations

import pytest

from metal_agent.controller.gate import EVERY_SERVICE, Gate, StaticGate
from metal_agent.core.claim import Allowlist, claim
from metal_agent.core.result import NotOurs
from metal_agent.fleet.gate import FleetGate
from tests.support.fleet_fakes import Fakes, gate_alone
from tests.support.manifests import isvc_doc, model_doc

KEY = "default/chat"


def test_the_static_gate_is_the_allowlist_and_nothing_more():
    gate: Gate = StaticGate(Allowlist.parse(["chat"]))
    assert gate.ready() and gate.admits("default", "chat") and gate.refusal("default", "chat") is None
    assert not gate.admits("default", "coder")
    assert "--inference-service-allowlist (chat)" in gate.refusal("default", "coder")
    assert gate.speaks_for("default/coder") and gate.unplaced(KEY) is None and gate.placement(KEY) == (None, 0)
    assert EVERY_SERVICE.admits("any", "thing")


def test_the_claim_rule_asks_a_gate_only_why_not():
    assert isinstance(claim(isvc_doc(), model_doc(), StaticGate(Allowlist(("other",)))), NotOurs)


@pytest.fixture
def fakes() -> Fakes:
    fakes = Fakes()
    fakes.isvcs[KEY] = isvc_doc(replicas=2)
    fakes.models["default/tiny"] = model_doc()
    return fakes


async def joined(fakes: Fakes, tmp_path, **settings) -> FleetGate:
    """Mac "a": its Lease renewed once, the lease watch listed."""
    gate = gate_alone(fakes, tmp_path, **settings)
    await gate.membership.renew()
    fakes.leases.deliver(gate.on_lease_change)
    fakes.synced.set()
    return gate


async def test_not_ready_until_the_leases_are_listed_and_ours_renewed(fakes, tmp_path):
    gate = gate_alone(fakes, tmp_path)
    assert not gate.ready()
    fakes.synced.set()
    assert not gate.ready() and not gate.admits("default", "chat")  # never renewed: fenced
    await gate.membership.renew()
    assert gate.ready()


async def test_a_replica_held_here_is_ours_and_the_reconciler_is_told_at_once(fakes, tmp_path):
    gate = await joined(fakes, tmp_path)
    assert gate.refusal("default", "chat") == "not placed on this Mac (a)"
    fakes.leases.hold(KEY, 1, "a")
    assert not gate.admits("default", "chat")  # written, not yet seen by the watch
    fakes.leases.deliver(gate.on_lease_change)
    assert gate.admits("default", "chat") and gate.serves(KEY) and fakes.told == [KEY]


async def test_another_live_macs_replica_is_refused_naming_it_and_it_speaks_for_the_service(fakes, tmp_path):
    gate = await joined(fakes, tmp_path)
    fakes.leases.renew_other("b")
    fakes.leases.hold(KEY, 0, "b")
    fakes.leases.hold(KEY, 1, "a")
    fakes.leases.deliver(gate.on_lease_change)
    assert gate.admits("default", "chat")  # a holds replica 1
    assert not gate.speaks_for(KEY)  # b holds the lowest live replica: b writes the status
    fakes.leases.hold(KEY, 1, "b")
    fakes.leases.deliver(gate.on_lease_change)
    assert gate.refusal("default", "chat") == "served by b, not by this Mac (a)"
    assert fakes.told == [KEY, KEY]  # ours, then not ours


async def test_a_mac_whose_lease_expired_neither_serves_nor_speaks(fakes, tmp_path):
    gate = await joined(fakes, tmp_path)
    fakes.leases.renew_other("b")
    fakes.leases.hold(KEY, 0, "b")
    fakes.leases.deliver(gate.on_lease_change)
    assert gate.refusal("default", "chat") == "served by b, not by this Mac (a)"
    fakes.clock.advance(41)  # b's Lease (40 s) expired by our clock; ours too, unless renewed
    await gate.membership.renew()
    assert gate.refusal("default", "chat") == "not placed on this Mac (a)"
    condition, elsewhere = gate.placement(KEY)
    assert elsewhere == 0 and condition.status is False


async def test_a_mac_that_cannot_renew_fences_itself_and_stops_serving(fakes, tmp_path):
    gate = await joined(fakes, tmp_path, lease_duration=40.0, renew_interval=10.0)
    fakes.leases.hold(KEY, 0, "a")
    fakes.leases.deliver(gate.on_lease_change)
    fakes.told.clear()
    fakes.leases.down = True
    fakes.clock.advance(29)
    await gate.membership.renew()
    gate.refresh()
    assert gate.serves(KEY) and gate.membership.renew_failures == 1  # still within the deadline (40 - 10 s)
    fakes.clock.advance(2)
    gate.refresh()
    assert not gate.serves(KEY) and fakes.told == [KEY]
    assert gate.refusal("default", "chat") == (
        f"this Mac (a) could not renew its fleet Lease in time; it stopped serving {KEY}")
    fakes.leases.down = False
    await gate.membership.renew()  # back: the replicas are re-read before anything is served again
    gate.refresh()
    assert gate.serves(KEY) and fakes.told == [KEY, KEY]


async def test_the_successor_of_a_draining_mac_serves_before_it_holds(fakes, tmp_path):
    gate = await joined(fakes, tmp_path)
    fakes.leases.renew_other("b", cordoned=True)
    fakes.leases.hold(KEY, 0, "b", successor="a")
    fakes.leases.deliver(gate.on_lease_change)
    assert gate.serves(KEY) and not gate.membership.holds(KEY)  # make before break


async def test_a_service_scaled_to_zero_is_kept_by_its_reporter_so_its_status_says_stopped(fakes, tmp_path):
    gate = await joined(fakes, tmp_path)
    fakes.isvcs[KEY] = isvc_doc(replicas=0)
    assert not gate.serves(KEY)
    gate.record({}, {KEY: 0}, {KEY: "a"})
    assert gate.serves(KEY) and gate.speaks_for(KEY) and fakes.told == [KEY]
    assert gate.placement(KEY) == (None, 0)
    gate.record({}, {KEY: 0}, {KEY: "b"})  # another Mac reports it now
    assert not gate.serves(KEY) and fakes.told == [KEY, KEY]
