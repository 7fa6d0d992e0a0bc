"""The placing half of the fleet: who bids for which replica, and the Lease writes that follow.

`Placer` is a part of `metal_agent.fleet.Fleet` (a mixin, for file size: it
reads the fleet's state and is never used alone). Each tick the fleet calls
`_place_all`, which turns what the watch shows into writes: bid for a free
replica after our place in line, release what we should not hold, take
over a draining Mac's replica once ours is ready, mark a silent Mac's
slices not ready. Every write that decides ownership is conditional on the
resourceVersion it was decided on (`LeaseClient.swap`), so two Macs acting
at once never both win.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import structlog

from metal_agent.core.admission import Reject, admit
from metal_agent.core.leases import Replica, member_lease_name, replica_lease
from metal_agent.core.memory import EstimateFailed, gib
from metal_agent.core.placement import Member, Wanted, bid_delay, rank, unschedulable_message
from metal_agent.core.replicas import plan_replicas
from metal_agent.core.status import Blocker

log = structlog.get_logger(__name__)

UNSCHEDULABLE = "Unschedulable"


class Placer:
    """Placement decisions and their Lease writes (see the module docstring)."""

    def _notice_deaths(self, now: float) -> None:
        alive = {name for name in self.members if name != self.me and self._alive(name, now)}
        for dead in self._alive_before - alive:
            if dead in self.members:
                log.warning("fleet member stopped renewing its lease; marking its slices not ready", member=dead)
                self._spawn(("member:" + dead, 0), self._mark_dead(dead))
        self._alive_before = alive

    async def _mark_dead(self, dead: str) -> None:
        seen = self.liveness.resource_version(dead)
        if seen is not None and await self.leases.resource_version(member_lease_name(dead)) not in (seen, None):
            return  # it did renew: our watch is behind, not the member dead
        if self.registrar is not None:
            changed = await self.registrar.mark_member_not_ready(dead, self.namespaces)
            if changed:
                log.info("marked a silent member's slices not ready", member=dead, slices=changed)

    def _place_all(self, now: float) -> None:
        alive_members = self.alive_members(now)
        for key in [k for k in self.reserved if k in self.memory.committed or not self.serves(k)]:
            del self.reserved[key]  # admitted (now counted by the memory guard) or no longer ours
        unplaced: dict[str, Blocker] = {}
        keys = set()
        # Not Metal's, or invalid: not placed; whoever holds it keeps it (the reconciler decides).
        desired, reporters = {}, {}
        for wanted, workload in self.wanted_services():
            keys.add(wanted.key)
            desired[wanted.key] = wanted.replicas
            reporters[wanted.key] = self._reporter(wanted, alive_members)
            if blocker := self._place(wanted, workload, alive_members, now):
                unplaced[wanted.key] = blocker
        for r in list(self.replicas.values()):  # the service is gone: its holder removes the Lease
            if r.holder == self.me and r.key not in keys and self.isvcs.get(r.key) is None:
                self._spawn((r.key, r.index), self._release(r))
        changed = {k for k in set(unplaced) | set(self._unplaced) if unplaced.get(k) != self._unplaced.get(k)}
        self._unplaced, self._desired, self._reporters = unplaced, desired, reporters
        self._notify()  # a service scaled to zero changes hands (see `_keeps_stopped`)
        for key in keys:  # the Mac that writes a service's status rewrites it when its placement changes
            said = self.placement(key)[0] if self.speaks_for(key) else None
            if said != self._said.get(key):
                self._said[key] = said
                changed.add(key)
        for key in set(self._said) - keys:
            del self._said[key]
        for key in changed:
            self.on_key(key)

    def _place(self, wanted: Wanted, workload: Any, members: list[Member], now: float) -> Blocker | None:
        infos = {m.name: m for m in members}
        refused = self._refused(wanted.key)
        plan = plan_replicas(wanted, self._replicas_of(wanted.key), self.me, alive=lambda name: self._alive(name, now),
                             cordoned=lambda name: name in infos and infos[name].cordoned,
                             announced=self.announced(wanted.key), refused=bool(refused))
        holders = plan.holders
        if refused and plan.release:  # admission refused it here: let another Mac try, and say why
            self.unfit[wanted.key] = (refused, sum(self.memory.committed.values()))
        for r in plan.release:
            self._spawn((wanted.key, r.index), self._release(r))
        for r in plan.promote:
            self._spawn((wanted.key, r.index), self._promote(r))
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
            self._spawn((wanted.key, index), self._bid(wanted, workload, index, r, kind))
            self._bidding = self._tasks[(wanted.key, index)]
        return None

    def _reporter(self, wanted: Wanted, members: list[Member]) -> str | None:
        names = sorted(m.name for m in members if m.admits_name(wanted.namespace, wanted.name))
        return names[0] if names else None

    def _judge_fit(self, key: str) -> None:
        """Forget a refusal once the memory it was judged against changed."""
        judged = self.unfit.get(key)
        if judged is not None and judged[1] != sum(self.memory.committed.values()) and not self._refused(key):
            del self.unfit[key]

    def _refused(self, key: str) -> str | None:
        """Why our memory admission holds back a service we serve (what it said of one we no
        longer serve is history: it is asked again if we win the service again)."""
        return self.waiting(key) if self.serves(key) else None

    async def _fits(self, key: str, workload: Any) -> bool:
        """With the model on disk, the memory admission's own answer; without it, yes (the
        reconciler checks again after the download and hands the replica back if it does not fit)."""
        path = self.model_files.present(workload.model)
        if path is None:
            return True
        estimate = await self.model_files.memory_estimate(path, workload.isvc.spec, self.model_files.engine_of(workload.model))
        running = {**self.memory.committed, **self.reserved}
        verdict = admit(key, estimate, running, hardware=workload.model.spec.hardware, total_ram_bytes=self.s.total_ram,
                        agent_fraction=self.s.agent_fraction, mode=self.memory.mode)
        if isinstance(verdict, Reject):
            self.unfit[key] = (f"{verdict.reason}: {verdict.message}", sum(self.memory.committed.values()))
            log.info("not bidding: the model does not fit here", service=key, why=verdict.message)
            return False
        if not isinstance(estimate, EstimateFailed):
            self.reserved[key] = estimate.total_bytes
        return True

    async def _bid(self, wanted: Wanted, workload: Any, index: int, r: Replica | None, kind: str) -> None:
        if not await self._fits(wanted.key, workload):
            await self.renew()  # say so at once: the next in line need not wait for our renewal
            return
        now = dt.datetime.now(dt.timezone.utc)
        duration = max(1, round(self.s.lease_duration))
        previous = r.holder if r else None
        if kind == "handoff":
            body = replica_lease(wanted.key, index, holder=r.holder, successor=self.me, duration_s=duration, now=now,
                                 resource_version=r.resource_version)
        else:
            if previous and previous != self.me:
                # Our watch may be behind: the holder must really have stopped renewing.
                seen = self.liveness.resource_version(previous)
                current = await self.leases.resource_version(member_lease_name(previous))
                if current is not None and current != seen:
                    return
                if self.registrar is not None:
                    await self.registrar.mark_member_not_ready(previous, self.namespaces)
            body = replica_lease(wanted.key, index, holder=self.me, duration_s=duration, now=now,
                                 resource_version=r.resource_version if r else None)
        won = await self.leases.swap(body)
        if won is None:
            self.reserved.pop(wanted.key, None)
            return
        self._adopt(won)
        free = gib(self.my_info().member.free_bytes)
        why = "model on disk" if wanted.model in self.my_info().member.models else "model to download"
        raw = self.isvcs.get(wanted.key)
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
        if raw is not None:
            self.events.emit(raw["metadata"], reason, message)

    async def _promote(self, r: Replica) -> None:
        body = replica_lease(r.key, r.index, holder=self.me, duration_s=max(1, round(self.s.lease_duration)),
                             now=dt.datetime.now(dt.timezone.utc), resource_version=r.resource_version)
        won = await self.leases.swap(body)
        if won is not None:
            self._adopt(won)
            self.on_key(r.key)  # successor -> holder: "ours?" is unchanged, but the status speaker may be us now
            message = f"replica {r.index} moved from {r.holder} (draining) to {self.me}: ready here"
            log.info("fleet: " + message, service=r.key)
            if (raw := self.isvcs.get(r.key)) is not None:
                self.events.emit(raw["metadata"], "Moved", message)

    async def _release(self, r: Replica) -> None:
        await self.leases.delete(r.lease_name, r.resource_version)
        self.replicas.pop(r.lease_name, None)
        self.reserved.pop(r.key, None)
        self._notify()
        log.info("fleet: released a replica", service=r.key, replica=r.index)
