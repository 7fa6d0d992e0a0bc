"""The FleetPlacement a speaking Mac writes counts the replicas the spec wants *now*.

Placement's loop re-reads the wanted replica count once per tick, but the
status of a scaled service is written as soon as the reconciler sees the new
spec. Counted with the tick's stale number, a scale from 2 to 3 was first
reported "Placed" (two of two) and a scale from 3 to 2 "1 replica unplaced"
once the third replica was released: a flip-flop LLMKube's controller showed
(tests/integration/test_fleet_llmkube.py). The gate is built here on fakes
(tests/support/fleet_fakes.py); its informers are plain dictionaries.
"""

from __future__ import annotations

from metal_agent.fleet.gate import FleetGate
from tests.support.fleet_fakes import Fakes, build
from tests.support.manifests import isvc_doc, model_doc


async def fleet_with(tmp_path, replicas_in_spec: int, held: int, tick_said: int) -> FleetGate:
    """This Mac ("a") renewed, holding `held` replicas; placement's last tick counted `tick_said`."""
    fakes = Fakes()
    fakes.isvcs["default/chat"] = isvc_doc(replicas=replicas_in_spec)
    fakes.models["default/tiny"] = model_doc()
    fakes.ready.add("default/chat")
    parts = build(fakes, tmp_path)
    await parts.membership.renew()
    for i in range(held):
        fakes.leases.hold("default/chat", i, "a")
    fakes.leases.deliver(parts.gate.on_lease_change)
    parts.gate.record({}, {"default/chat": tick_said}, {"default/chat": "a"})
    return parts.gate


async def test_scaled_down_the_released_replica_is_not_named_nor_missed(tmp_path):
    for held in (3, 2):  # before and after the third replica's Lease is released
        condition, _ = (await fleet_with(tmp_path, replicas_in_spec=2, held=held, tick_said=3)).placement("default/chat")
        assert condition.status is True and condition.reason == "Placed", condition
        assert "replica 2" not in condition.message and "unplaced" not in condition.message


async def test_scaled_up_the_new_replica_is_unplaced_at_once(tmp_path):
    condition, _ = (await fleet_with(tmp_path, replicas_in_spec=3, held=2, tick_said=2)).placement("default/chat")
    assert condition.status is False and condition.reason == "Placing"
    assert condition.message.endswith("1 replica unplaced")


async def test_scaled_to_zero_says_nothing(tmp_path):
    assert (await fleet_with(tmp_path, replicas_in_spec=0, held=1, tick_said=1)).placement("default/chat") == (None, 0)
