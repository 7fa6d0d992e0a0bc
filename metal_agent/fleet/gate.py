"""The fleet as the controller's gate (`metal_agent.controller.gate.Gate`): is this service ours?

A service is this Mac's while it holds one of its replica Leases (or takes one
over from a draining Mac), and not while it is fenced. One Mac speaks for each
service (writes its status): the holder of its lowest live replica, or, while
none serves it, the member that reports it unplaced. A service scaled to zero
is nobody's replica: its reporter keeps it so that its status says Stopped.

Placement (`fleet.placer.Placer`) tells the gate what it found on each tick
(`record`); the lease watch lands here too (`on_lease_change`), so that every
service whose answer changed is re-queued at once (`refresh`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Callable

from metal_agent.core.claim import Allowlist
from metal_agent.core.conditions import Condition
from metal_agent.core.placement import placement_condition
from metal_agent.core.status import Blocker
from metal_agent.fleet.demand import Demand
from metal_agent.fleet.membership import Membership


class FleetGate:
    def __init__(self, membership: Membership, *, allowlist: Allowlist, demand: Demand,
                 process_ready: Callable[[str], bool], on_key: Callable[[str], None],
                 now: Callable[[], float] = time.monotonic) -> None:
        self.membership = membership
        self.me = membership.me
        self.allowlist = allowlist
        self.demand = demand
        self.process_ready = process_ready
        self.on_key = on_key  # re-queue a service whose answer changed
        self.now = now
        self._unplaced: dict[str, Blocker] = {}
        self._desired: dict[str, int] = {}  # replicas wanted, per service, as of placement's last tick
        self._reporters: dict[str, str | None] = {}  # who speaks for a service no Mac serves
        self._served: set[str] = set()

    # -- the gate protocol ----------------------------------------------------

    def ready(self) -> bool:
        return self.membership.ready()

    def refusal(self, namespace: str, name: str) -> str | None:
        if why := self.allowlist.refusal(namespace, name):
            return why
        key = f"{namespace}/{name}"
        if self.serves(key):
            return None
        m = self.membership
        replicas = m.replicas_of(key)
        holders = sorted({r.holder for r in replicas if r.holder and m.alive(r.holder)})
        if m.fenced() and any(r.holder == self.me for r in replicas):
            return f"this Mac ({self.me}) could not renew its fleet Lease in time; it stopped serving {key}"
        return (f"served by {', '.join(holders)}, not by this Mac ({self.me})" if holders
                else f"not placed on this Mac ({self.me})")

    def admits(self, namespace: str, name: str) -> bool:
        return self.refusal(namespace, name) is None

    def speaks_for(self, key: str) -> bool:
        m = self.membership
        live = sorted((r.index, r.holder) for r in m.replicas_of(key) if r.holder and m.alive(r.holder))
        if live:
            return live[0][1] == self.me and not m.fenced()
        return key in self._unplaced or self.keeps_stopped(key)

    def unplaced(self, key: str) -> Blocker | None:
        return self._unplaced.get(key)

    def placement(self, key: str) -> tuple[Condition | None, int]:
        """Which Mac serves each replica (`FleetPlacement`), and how many are ready elsewhere."""
        m, now = self.membership, self.now()
        holders: dict[int, tuple[str, bool]] = {}
        elsewhere = 0
        for r in m.replicas_of(key):
            if not r.holder or not m.alive(r.holder, now):
                continue
            if r.holder == self.me:
                ready = self.process_ready(key)
            else:
                info = m.members.get(r.holder)
                ready = info is not None and f"{key}#{r.index}" in info.serving
                elsewhere += ready
            holders[r.index] = (r.holder, ready)
        unplaced = self._unplaced.get(key)
        replicas = self.replicas_now(key)
        replicas = max(holders, default=-1) + 1 if replicas is None else replicas
        if replicas == 0:
            return None, 0
        return placement_condition(replicas, holders, unplaced.message if unplaced else None), elsewhere

    # -- what this Mac serves ---------------------------------------------------

    def serves(self, key: str) -> bool:
        """Should this Mac run `key`: it holds a replica, or takes one over from a draining Mac."""
        m = self.membership
        if m.fenced():
            return False
        if self.keeps_stopped(key):
            return True
        return any(r.holder == self.me or (r.successor == self.me and r.holder and m.alive(r.holder))
                   for r in m.replicas_of(key))

    def keeps_stopped(self, key: str) -> bool:
        """A service scaled to zero (or suspended) is nobody's replica: one Mac, the reporter,
        takes it as its own so that its status says Stopped/Suspended."""
        return self._desired.get(key) == 0 and self._reporters.get(key) == self.me and not self.membership.fenced()

    def replicas_now(self, key: str) -> int | None:
        """The replicas `key` wants per the informer now, not as of placement's last tick: the
        status written for a scale must count with the new number (with the old one, a scale
        from 3 to 2 said "1 replica unplaced" once the third was released, then took it back)."""
        now = self.demand.replicas_now(key)
        return now if now is not None else self._desired.get(key)

    def unplaced_services(self) -> Mapping[str, Blocker]:
        """Every service this Mac reports as placed nowhere, and why."""
        return dict(self._unplaced)

    # -- what changes the answers ---------------------------------------------------

    def on_lease_change(self, old: dict | None, new: dict | None) -> None:
        """The lease watch's handler: membership learns, then the changed answers are re-queued."""
        self.membership.on_lease_change(old, new)
        self.refresh()

    def record(self, unplaced: dict[str, Blocker], desired: dict[str, int],
               reporters: dict[str, str | None]) -> set[str]:
        """Placement's findings of one tick; returns the services whose unplaced reason changed."""
        changed = {k for k in set(unplaced) | set(self._unplaced) if unplaced.get(k) != self._unplaced.get(k)}
        self._unplaced, self._desired, self._reporters = unplaced, desired, reporters
        self.refresh()  # a service scaled to zero changes hands (see `keeps_stopped`)
        return changed

    def refresh(self) -> None:
        """Re-queue every service whose "ours?" answer changed."""
        served = {r.key for r in self.membership.replicas.values() if self.serves(r.key)} | \
            {k for k in self._desired if self.keeps_stopped(k)}
        for key in served ^ self._served:
            self.on_key(key)
        self._served = served
