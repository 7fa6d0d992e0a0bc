"""Who is in the fleet: the Leases this Mac and the others hold, who is alive, and our own renewal.

`Membership` keeps what the lease watch shows (member Leases: who is there and
alive by our own clock; replica Leases: who holds what) and renews this Mac's
member Lease. A Mac that could not renew in time is *fenced*: it serves
nothing, because others may take its replicas once its Lease expires. After a
fence it re-reads the replica Leases before serving anything again.

`LocalMember` is this Mac as it describes itself in its Lease (memory budget
and what is committed, models on disk, services it refused, cordoned), with
the bookkeeping only it keeps: memory reserved for replicas won but not yet
admitted, and refusals (`unfit`). Placement writes that bookkeeping;
membership publishes it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Callable

import structlog

from metal_agent.core.admission import memory_budget
from metal_agent.core.leases import (
    REPLICA_ROLE,
    ROLE_LABEL,
    Liveness,
    MemberInfo,
    Replica,
    fence_deadline,
    member_lease,
    parse_member,
    parse_replica,
    role,
)
from metal_agent.core.placement import Member
from metal_agent.fleet.demand import Demand
from metal_agent.fleet.ports import API_ERRORS, LeasePort, MemoryPort
from metal_agent.fleet.settings import FleetSettings

log = structlog.get_logger(__name__)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class LocalMember:
    """This Mac's own numbers (see the module docstring)."""

    def __init__(self, settings: FleetSettings, *, memory: MemoryPort, demand: Demand, allowlist: tuple[str, ...],
                 process_ready: Callable[[str], bool], cordon_file: Path, version: str) -> None:
        self.s = settings
        self.me = settings.member
        self.memory = memory
        self.demand = demand
        self.allowlist = allowlist
        self.process_ready = process_ready
        self.version = version
        self._cordon_file = cordon_file
        self.cordoned = cordon_file.exists()
        self.unfit: dict[str, tuple[str, int]] = {}  # key -> (why, committed bytes when judged)
        self.reserved: dict[str, int] = {}  # won, not yet admitted by the reconciler

    def committed(self) -> int:
        """What the memory admission has committed to running services."""
        return sum(self.memory.committed.values())

    def info(self, held: Iterable[Replica]) -> MemberInfo:
        """Our member Lease's content, given the replicas we hold."""
        budget = memory_budget(None, self.s.total_ram, self.s.agent_fraction).bytes if self.s.total_ram else 0
        unfit = {k: why for k, (why, _) in self.unfit.items()}
        member = Member(name=self.me, labels=self.s.labels, cordoned=self.cordoned, budget_bytes=budget,
                        committed_bytes=self.committed() + sum(self.reserved.values()),
                        models=frozenset(self.demand.models_present()), allowlist=self.allowlist, unfit=unfit)
        serving = tuple(sorted(f"{r.key}#{r.index}" for r in held if self.process_ready(r.key)))
        return MemberInfo(member, host=self.s.host, chip=self.s.chip, total_bytes=self.s.total_ram,
                          serving=serving, version=self.version)

    def fingerprint(self, held: Iterable[Replica]) -> tuple:
        """What others rank us by: when it changes, we renew at once."""
        serving = frozenset(r.key for r in held if self.process_ready(r.key))
        committed = self.committed() + sum(self.reserved.values())
        return (frozenset(self.demand.models_present()), frozenset(self.unfit), self.cordoned, serving, committed)

    async def set_cordoned(self, cordoned: bool) -> None:
        """Remembered across restarts in the state directory (a drained Mac stays drained)."""
        self.cordoned = cordoned
        if cordoned:
            await asyncio.to_thread(self._cordon_file.write_text, "drained with `metal-agent drain`\n")
        else:
            await asyncio.to_thread(self._cordon_file.unlink, True)


class Membership:
    """The lease watch's view of the fleet, and our own member Lease (see the module docstring)."""

    def __init__(self, settings: FleetSettings, *, leases: LeasePort, local: LocalMember, synced: asyncio.Event,
                 now: Callable[[], float] = time.monotonic, wall: Callable[[], dt.datetime] = utc_now) -> None:
        self.s = settings
        self.me = settings.member
        self.leases = leases
        self.local = local
        self.synced = synced  # set by the lease watch once it has listed
        self.now = now
        self.wall = wall
        self.members: dict[str, MemberInfo] = {}  # others, by name, as their Leases say
        self.replicas: dict[str, Replica] = {}  # by Lease name
        self.liveness = Liveness()
        self.last_renewed: float | None = None
        self.renewed = asyncio.Event()  # set at the first renewal that succeeds, never cleared
        self.renew_failures = 0  # in a row
        self.renewals = {"ok": 0, "failed": 0}  # since start, for /metrics
        self._own_rv: str | None = None
        self._published: tuple = ()

    # -- questions ------------------------------------------------------------

    def ready(self) -> bool:
        """The Leases are read and ours renewed: until then we know nothing of what we hold."""
        return self.synced.is_set() and self.last_renewed is not None

    async def wait_ready(self) -> None:
        """Until `ready()`: woken by the lease watch's first list and our first renewal, not polled."""
        while not self.ready():
            await self.synced.wait()
            await self.renewed.wait()

    def fenced(self, now: float | None = None) -> bool:
        if self.last_renewed is None:
            return True
        now = self.now() if now is None else now
        return now > fence_deadline(self.last_renewed, self.s.lease_duration, self.s.renew_interval)

    def alive(self, member: str, now: float | None = None) -> bool:
        if member == self.me:
            return not self.fenced(now)
        return member in self.members and self.liveness.alive(member, self.now() if now is None else now)

    def expires_in(self, member: str, now: float | None = None) -> float | None:
        """Seconds until another member's Lease expires by our clock (None: never seen)."""
        return self.liveness.expires_in(member, self.now() if now is None else now)

    def seen_version(self, member: str) -> str | None:
        """The resourceVersion of `member`'s Lease as our watch last saw it."""
        return self.liveness.resource_version(member)

    def replicas_of(self, key: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.key == key]

    def replicas_held(self, member: str) -> list[Replica]:
        return sorted((r for r in self.replicas.values() if r.holder == member), key=lambda r: (r.key, r.index))

    def holds(self, key: str) -> bool:
        """Does this Mac hold (not just succeed to) a replica of `key`, with a live Lease?"""
        return not self.fenced() and any(r.holder == self.me for r in self.replicas_of(key))

    def my_info(self) -> MemberInfo:
        return self.local.info(r for r in self.replicas.values() if r.holder == self.me)

    def others(self) -> Mapping[str, MemberInfo]:
        """The other members as their Leases last said (alive or not)."""
        return dict(self.members)

    def alive_members(self, now: float | None = None, *, me: bool = True) -> list[Member]:
        """Placement's view: every member whose Lease is live (ourselves from our own numbers)."""
        now = self.now() if now is None else now
        members = [info.member for name, info in self.members.items() if name != self.me and self.alive(name, now)]
        if me and not self.fenced(now):
            members.append(self.my_info().member)
        return members

    def has_news(self) -> bool:
        """What others rank us by changed since our last renewal (a model now on disk, a refusal)."""
        return self.local.fingerprint(r for r in self.replicas.values() if r.holder == self.me) != self._published

    # -- the lease watch --------------------------------------------------------

    def on_lease_change(self, old: dict | None, new: dict | None) -> None:
        obj = new or old or {}
        name = (obj.get("metadata") or {}).get("name") or ""
        if role(obj) == "member":
            info = parse_member(new) if new is not None else None
            if info is None:
                gone = parse_member(old) if old else None
                if gone is not None:
                    self.members.pop(gone.member.name, None)
                    self.liveness.forget(gone.member.name)
            else:
                self.members[info.member.name] = info
                spec = new.get("spec") or {}
                self.liveness.observe(info.member.name, (new.get("metadata") or {}).get("resourceVersion") or "",
                                      float(spec.get("leaseDurationSeconds") or self.s.lease_duration), self.now())
        elif role(obj) == "replica":
            replica = parse_replica(new) if new is not None else None
            if replica is None:
                self.replicas.pop(name, None)
            else:
                self.replicas[name] = replica

    def adopt(self, obj: dict | None) -> bool:
        """A replica write of ours that succeeded: known now, not one watch event later."""
        if obj is not None and (replica := parse_replica(obj)) is not None:
            self.replicas[replica.lease_name] = replica
            return True
        return False

    def forget(self, replica: Replica) -> None:
        """A replica Lease we deleted."""
        self.replicas.pop(replica.lease_name, None)

    # -- our own Lease ------------------------------------------------------------

    async def renew(self) -> None:
        """Write our member Lease; count and log a failure (the fence deadline says what it costs)."""
        started = self.now()
        self._published = self.local.fingerprint(r for r in self.replicas.values() if r.holder == self.me)
        body = member_lease(self.my_info(), duration_s=self.s.lease_seconds, now=self.wall())
        try:
            written = await self.leases.put(body, self._own_rv)
            self._own_rv = (written.get("metadata") or {}).get("resourceVersion")
        except API_ERRORS as err:
            self._own_rv = None  # read it afresh next time
            self.renew_failures += 1
            self.renewals["failed"] += 1
            log.warning("fleet lease renewal failed", member=self.me, error=f"{type(err).__name__}: {err}",
                        serving_for_s=round(fence_deadline(self.last_renewed, self.s.lease_duration, self.s.renew_interval)
                                            - self.now(), 1) if self.last_renewed else None)
            return
        if self.last_renewed is not None and self.fenced(started):
            if not await self._reread_replicas():
                return
        elif self.last_renewed is None:
            log.info("fleet lease renewed", member=self.me, namespace=self.s.namespace)
        self.renew_failures = 0
        self.renewals["ok"] += 1
        self.last_renewed = started
        self.renewed.set()

    async def _reread_replicas(self) -> bool:
        """Back after a fence: our watch may still show replicas that moved while we were
        away. Read them afresh before serving anything again (False: could not; stay fenced)."""
        try:
            fresh = await self.leases.list(f"{ROLE_LABEL}={REPLICA_ROLE}")
        except API_ERRORS as err:
            log.warning("could not re-read the replica leases; staying fenced", error=f"{type(err).__name__}: {err}")
            return False
        self.replicas = {r.lease_name: r for r in map(parse_replica, fresh) if r is not None}
        log.info("fleet lease renewed after a fence; replicas re-read", member=self.me,
                 holds=sorted(f"{r.key}#{r.index}" for r in self.replicas.values() if r.holder == self.me))
        return True

    async def set_cordoned(self, cordoned: bool) -> None:
        """`metal-agent drain` / `uncordon`: said in our Lease at once."""
        await self.local.set_cordoned(cordoned)
        log.info("cordoned: handing replicas over and taking no new ones" if cordoned else "uncordoned", member=self.me)
        await self.renew()
