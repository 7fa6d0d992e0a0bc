"""The fleet's one loop: everything that is not a reaction to the lease watch, every `tick` seconds.

Renew our member Lease when due (at once when what others rank us by
changed), let a fence that just fell stop what we serve, then, once the
Leases are read and ours renewed, notice members whose Lease expired and
place (`fleet.placer.Placer`). The renewal runs beside the loop, one at a
time, so a slow API server never delays the fence.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from metal_agent.fleet.gate import FleetGate
from metal_agent.fleet.membership import Membership
from metal_agent.fleet.placer import Placer
from metal_agent.fleet.settings import FleetSettings
from metal_agent.tasks import KeyedTasks

RENEW = "renew"


class FleetLoop:
    def __init__(self, settings: FleetSettings, *, membership: Membership, gate: FleetGate, placer: Placer,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.membership, self.gate, self.placer = membership, gate, placer
        self.now = now
        self.renewal: KeyedTasks[str] = KeyedTasks("fleet lease renewal")
        self._last_attempt = float("-inf")

    def tick(self) -> None:
        """One round (the loop's body, also what the unit tests drive with their own clock)."""
        m, now = self.membership, self.now()
        if (m.has_news() or now - self._last_attempt >= self.s.renew_interval) and not self.renewal.busy(RENEW):
            self._last_attempt = now
            self.renewal.start(RENEW, self._renew())
        self.gate.refresh()  # a fence that just fell stops what we serve
        if m.ready():
            if not m.fenced(now):  # cut off ourselves, everyone looks dead: judge nobody
                self.placer.notice_deaths(now)
            self.placer.place_all(now)

    async def _renew(self) -> None:
        await self.membership.renew()
        self.gate.refresh()

    async def run(self) -> None:
        """Tick until cancelled; then cancel the renewal and the Lease writes in flight, and wait for them."""
        try:
            while True:
                self.tick()
                await asyncio.sleep(self.s.tick)
        finally:
            try:
                await self.renewal.close()
            finally:
                await self.placer.close()
