"""The placing half of the fleet: who bids for which replica, and the Lease writes that follow.

On each tick the fleet's loop calls `place_all`, which turns what the lease
watch shows into writes: bid for a free replica after our place in line,
release what we should not hold, take over a draining Mac's replica once ours
is ready, mark a silent Mac's slices not ready. Every write that decides
ownership is conditional on the resourceVersion it was decided on
(`LeaseClient.swap`), so two Macs acting at once never both win. Writes run
as `tasks.KeyedTasks`, one at a time per replica slot.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import structlog

from metal_agent.core.admission import Reject, admit
from metal_agent.core.conditions import Condition
from metal_agent.core.leases import Replica, member_lease_name, replica_lease
from metal_agent.core.memory import EstimateFailed, gib
from metal_agent.core.placement import Member, Wanted, bid_delay, rank, unschedulable_message
from metal_agent.core.replicas import plan_replicas
from metal_agent.core.status import Blocker
from metal_agent.fleet.demand import Demand
from metal_agent.fleet.gate import FleetGate
from metal_agent.fleet.membership import LocalMember, Membership
from metal_agent.fleet.ports import API_ERRORS, EventSink, LeasePort, MemoryPort, ModelFilesPort, Slices
from metal_agent.fleet.settings import FleetSettings
from metal_agent.tasks import KeyedTasks

log = structlog.get_logger(__name__)

UNSCHEDULABLE = "Unschedulable"

Slot = tuple[str, int]  # (service key, replica index); ("member:<name>", 0) for a silent Mac's slices


class Placer:
    """Placement decisions and their Lease writes (see the module docstring)."""

    def __init__(self, settings: FleetSettings, *, membership: Membership, gate: FleetGate, local: LocalMember,
                 demand: Demand, leases: LeasePort, slices: Slices, memory: MemoryPort, model_files: ModelFilesPort,
                 events: EventSink, waiting: Callable[[str], str | None], on_key: Callable[[str], None],
                 now: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.me = settings.member
        self.membership, self.gate, self.local, self.demand = membership, gate, local, demand
        self.leases = leases
        self.slices = slices
        self.memory = memory
        self.model_files = model_files
        self.events = events
        self.waiting = waiting  # why the memory admission holds a service back, while it does
        self.on_key = on_key
        self.now = now
        self.writes: KeyedTasks[Slot] = KeyedTasks("fleet lease write", expected=API_ERRORS)
        # per free replica: since when we wait, and at which place in line (a new place restarts the wait)
        self._free_since: dict[Slot, tuple[float, float]] = {}
        self._bidding: asyncio.Task | None = None  # one bid at a time: each win changes the numbers
        self._alive_before: set[str] = set()
        self._said: dict[str, Condition | None] = {}  # the placement each service's status last heard of

    async def close(self) -> None:
        """Cancel the writes in flight and wait for them."""
        await self.writes.close()

    def notice_deaths(self, now: float) -> None:
        m = self.membership
        alive = {name for name in m.members if name != self.me and m.alive(name, now)}
        for dead in self._alive_before - alive:
            if dead in m.members:
                log.warning("fleet member stopped renewing its lease; marking its slices not ready", member=dead)
                self.writes.start(("member:" + dead, 0), self._mark_dead(dead))
        self._alive_before = alive

    async def _mark_dead(self, dead: str) -> None:
        seen = self.membership.seen_version(dead)
        if seen is not None and await self.leases.resource_version(member_lease_name(dead)) not in (seen, None):
            return  # it did renew: our watch is behind, not the member dead
        changed = await self.slices.mark_member_not_ready(dead, self.s.namespaces)
        if changed:
            log.info("marked a silent member's slices not ready", member=dead, slices=changed)

    def place_all(self, now: float) -> None:
        m, local = self.membership, self.local
        alive_members = m.alive_members(now)
        for key in [k for k in local.reserved if k in self.memory.committed or not self.gate.serves(k)]:
            del local.reserved[key]  # admitted (now counted by the memory guard) or no longer ours
        unplaced: dict[str, Blocker] = {}
        keys = set()
        # Not Metal's, or invalid: not placed; whoever holds it keeps it (the reconciler decides).
        desired, reporters = {}, {}
        for wanted, workload in self.demand.wanted_services():
            keys.add(wanted.key)
            desired[wanted.key] = wanted.replicas
            reporters[wanted.key] = self._reporter(wanted, alive_members)
            if blocker := self._place(wanted, workload, alive_members, now):
                unplaced[wanted.key] = blocker
        for r in list(m.replicas.values()):  # the service is gone: its holder removes the Lease
            if r.holder == self.me and r.key not in keys and not self.demand.exists(r.key):
                self.writes.start((r.key, r.index), self._release(r))
        changed = self.gate.record(unplaced, desired, reporters)
        for key in keys:  # the Mac that writes a service's status rewrites it when its placement changes
            said = self.gate.placement(key)[0] if self.gate.speaks_for(key) else None
            if said != self._said.get(key):
                self._said[key] = said
                changed.add(key)
        for key in set(self._said) - keys:
            del self._said[key]
        for key in changed:
            self.on_key(key)

    def _place(self, wanted: Wanted, workload: Any, members: list[Member], now: float) -> Blocker | None:
        m = self.membership
        infos = {member.name: member for member in members}
        refused = self._refused(wanted.key)
        plan = plan_replicas(wanted, m.replicas_of(wanted.key), self.me, alive=lambda name: m.alive(name, now),
                             cordoned=lambda name: name in infos and infos[name].cordoned,
                             announced=self.slices.announced(wanted.key), refused=bool(refused))
        holders = plan.holders
        if refused and plan.release:  # admission refused it here: let another Mac try, and say why
            self.local.unfit[wanted.key] = (refused, self.local.committed())
        for r in plan.release:
            self.writes.start((wanted.key, r.index), self._release(r))
        for r in plan.promote:
            self.writes.start((wanted.key, r.index), self._promote(r))
        free = list(plan.free)
        for slot in [s for s in self._free_since if s[0] == wanted.key and s[1] not in {f[0] for f in free}]:
            del self._free_since[slot]
        if not free:
            return None
        self._judge_fit(wanted.key)
        candidates = rank(wanted, members, holders)
        if not candidates:
            if [f for f in free if f[2] == "free"] and self._reporter(wanted, members) == self.me:
                return Blocker(UNSCHEDULABLE, unschedulable_message(wanted, members, holders), phase="Pending")
            return None
        delay = bid_delay(wanted, members, self.me, self.s.bid_step, holders)
        if delay is None:
            return None
        index, r, kind = free[0]
        if not (r is not None and r.holder):  # a new replica: even the first in line waits one step, for the
            delay += self.s.bid_step          # news (models on disk, refusals) of a new service to arrive
        since, waited_for = self._free_since.get((wanted.key, index), (now, delay))
        if delay > waited_for:  # we fell back in line (another Mac has more room now): wait anew
            since = now
        self._free_since[(wanted.key, index)] = (since, delay)
        if now - since >= delay and (self._bidding is None or self._bidding.done()):
            # One bid at a time: what we win lowers our free memory, and the next service
            # must be ranked with that (else the first Mac in name order takes everything).
            slot = (wanted.key, index)
            self._bidding = self.writes.start(slot, self._bid(wanted, workload, index, r, kind)) or \
                self.writes.current(slot)
        return None

    def _reporter(self, wanted: Wanted, members: list[Member]) -> str | None:
        names = sorted(m.name for m in members if m.admits_name(wanted.namespace, wanted.name))
        return names[0] if names else None

    def _judge_fit(self, key: str) -> None:
        """Forget a refusal once the memory it was judged against changed."""
        judged = self.local.unfit.get(key)
        if judged is not None and judged[1] != self.local.committed() and not self._refused(key):
            del self.local.unfit[key]

    def _refused(self, key: str) -> str | None:
        """Why our memory admission holds back a service we serve (what it said of one we no
        longer serve is history: it is asked again if we win the service again)."""
        return self.waiting(key) if self.gate.serves(key) else None

    async def _fits(self, key: str, workload: Any) -> bool:
        """With the model on disk, the memory admission's own answer; without it, yes (the
        reconciler checks again after the download and hands the replica back if it does not fit)."""
        path = self.model_files.present(workload.model)
        if path is None:
            return True
        estimate = await self.model_files.memory_estimate(path, workload.isvc.spec, self.model_files.engine_of(workload.model),
                                                          workload.model.spec)
        running = {**self.memory.committed, **self.local.reserved}
        verdict = admit(key, estimate, running, hardware=workload.model.spec.hardware, total_ram_bytes=self.s.total_ram,
                        agent_fraction=self.s.agent_fraction, mode=self.memory.mode)
        if isinstance(verdict, Reject):
            self.local.unfit[key] = (f"{verdict.reason}: {verdict.message}", self.local.committed())
            log.info("not bidding: the model does not fit here", service=key, why=verdict.message)
            return False
        if not isinstance(estimate, EstimateFailed):
            self.local.reserved[key] = estimate.total_bytes
        return True

    async def _bid(self, wanted: Wanted, workload: Any, index: int, r: Replica | None, kind: str) -> None:
        if not await self._fits(wanted.key, workload):
            await self.membership.renew()  # say so at once: the next in line need not wait for our renewal
            self.gate.refresh()
            return
        previous = r.holder if r else None
        if kind == "handoff":
            body = replica_lease(wanted.key, index, holder=r.holder, successor=self.me, duration_s=self.s.lease_seconds,
                                 now=self.membership.wall(), resource_version=r.resource_version)
        else:
            if previous and previous != self.me:
                # Our watch may be behind: the holder must really have stopped renewing.
                seen = self.membership.seen_version(previous)
                current = await self.leases.resource_version(member_lease_name(previous))
                if current is not None and current != seen:
                    return
                await self.slices.mark_member_not_ready(previous, self.s.namespaces)
            body = replica_lease(wanted.key, index, holder=self.me, duration_s=self.s.lease_seconds,
                                 now=self.membership.wall(), resource_version=r.resource_version if r else None)
        won = await self.leases.swap(body)
        if won is None:
            self.local.reserved.pop(wanted.key, None)
            return
        self._adopt(won)
        self._tell_won(wanted, index, previous, kind)

    def _tell_won(self, wanted: Wanted, index: int, previous: str | None, kind: str) -> None:
        """The Event and log line of a replica won."""
        member = self.membership.my_info().member
        free = gib(member.free_bytes)
        why = "model on disk" if wanted.model in member.models else "model to download"
        if kind == "handoff":
            message = f"replica {index} moving from {previous} (draining) to {self.me}: starting here first"
            reason = "Moving"
        elif previous and previous != self.me:
            message = f"replica {index} moved from {previous} (stopped renewing its lease) to {self.me} ({why}, {free} free)"
            reason = "Moved"
        else:
            message = f"replica {index} placed on {self.me} ({why}, {free} free)"
            reason = "Placed"
        log.info("fleet: " + message, service=wanted.key)
        if (raw := self.demand.raw(wanted.key)) is not None:
            self.events.emit(raw["metadata"], reason, message)

    async def _promote(self, r: Replica) -> None:
        body = replica_lease(r.key, r.index, holder=self.me, duration_s=self.s.lease_seconds,
                             now=self.membership.wall(), resource_version=r.resource_version)
        won = await self.leases.swap(body)
        if won is not None:
            self._adopt(won)
            self.on_key(r.key)  # successor -> holder: "ours?" is unchanged, but the status speaker may be us now
            message = f"replica {r.index} moved from {r.holder} (draining) to {self.me}: ready here"
            log.info("fleet: " + message, service=r.key)
            if (raw := self.demand.raw(r.key)) is not None:
                self.events.emit(raw["metadata"], "Moved", message)

    async def _release(self, r: Replica) -> None:
        await self.leases.delete(r.lease_name, r.resource_version)
        self.membership.forget(r)
        self.local.reserved.pop(r.key, None)
        self.gate.refresh()
        log.info("fleet: released a replica", service=r.key, replica=r.index)

    def _adopt(self, won: dict) -> None:
        if self.membership.adopt(won):
            self.gate.refresh()
