"""The FleetPlacement a speaking Mac writes counts the replicas the spec wants *now*.

Placement's loop re-reads the wanted replica count once per tick, but the
status of a scaled service is written as soon as the reconciler sees the new
spec. Counted with the tick's stale number, a scale from 2 to 3 was first
reported "Placed" (two of two) and a scale from 3 to 2 "1 replica unplaced"
once the third replica was released: a flip-flop LLMKube's controller showed
(tests/integration/test_fleet_llmkube.py). Fleet is built here with plain
dictionaries for its informers; nothing else of it is used.
"""

from __future__ import annotations

import time

from metal_agent.core.claim import Allowlist
from metal_agent.core.leases import Replica
from metal_agent.fleet import Fleet, FleetSettings
from tests.support.manifests import isvc_doc, model_doc


class Store(dict):
    """An informer's reads: `get(key)`, `items()` (the objects), `cache`."""

    def items(self):
        return list(self.values())

    @property
    def cache(self) -> dict:
        return self


def fleet_with(tmp_path, replicas_in_spec: int, held: int, tick_said: int) -> Fleet:
    isvcs = Store({"default/chat": isvc_doc(replicas=replicas_in_spec)})
    fleet = Fleet(FleetSettings(member="a"), leases=None, isvcs=isvcs, models=Store({"default/tiny": model_doc()}),
                  static=Allowlist(), memory=None, model_files=None, events=None, version="test", namespaces=None,
                  state_dir=tmp_path, process_ready=lambda key: True)
    fleet.last_renewed = time.monotonic()
    fleet.replicas = {f"r{i}": Replica("default/chat", i, "a", None, "1", f"r{i}") for i in range(held)}
    fleet._desired = {"default/chat": tick_said}
    return fleet


def test_scaled_down_the_released_replica_is_not_named_nor_missed(tmp_path):
    for held in (3, 2):  # before and after the third replica's Lease is released
        condition, _ = fleet_with(tmp_path, replicas_in_spec=2, held=held, tick_said=3).placement("default/chat")
        assert condition.status is True and condition.reason == "Placed", condition
        assert "replica 2" not in condition.message and "unplaced" not in condition.message


def test_scaled_up_the_new_replica_is_unplaced_at_once(tmp_path):
    condition, _ = fleet_with(tmp_path, replicas_in_spec=3, held=2, tick_said=2).placement("default/chat")
    assert condition.status is False and condition.reason == "Placing"
    assert condition.message.endswith("1 replica unplaced")


def test_scaled_to_zero_says_nothing(tmp_path):
    assert fleet_with(tmp_path, replicas_in_spec=0, held=1, tick_said=1).placement("default/chat") == (None, 0)
