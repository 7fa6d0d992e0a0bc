"""Many Macs, one cluster: this Mac's membership, and which replicas it serves.

The fleet joins the pure rules (`core.placement`, `core.leases`) to the
cluster (`adapters.kube.leases`, the lease watch) and to the reconciler, to
which it is one more gate in front of "is this service ours?" (the
`Allowlist` protocol of `core.claim`): a service is this Mac's while it
holds one of its replica Leases, and not otherwise. See the README's
"Fleets" section for the design and why it bids rather than elects.

One loop (`run`) does everything that is not a reaction to the watch,
every `tick` seconds: renew our member Lease when due, fence ourselves when
renewals have failed for too long, then place (`metal_agent.fleet_placer`):
notice members whose Lease expired, bid for free replicas after our rank's
delay, hand over what we are draining.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import structlog
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.admission import memory_budget
from metal_agent.core.claim import Allowlist, evaluate, wanted_draft, wanted_model
from metal_agent.core.conditions import Condition
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
from metal_agent.core.placement import Member, Wanted, placement_condition, wanted_from
from metal_agent.core.result import Parsed
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.core.status import Blocker
from metal_agent.core.validation import parse_model
from metal_agent.fleet_placer import Placer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FleetSettings:
    member: str
    namespace: str = "metal-agent"
    labels: dict[str, str] = field(default_factory=dict)
    lease_duration: float = 40.0
    renew_interval: float = 10.0
    bid_step: float = 2.0  # seconds of delay per place in the preference order
    host: str = ""
    chip: str = ""
    total_ram: int = 0
    agent_fraction: float | None = None
    default_engine: str = "llama-server"  # the agent's --default-runtime: judged as the reconciler judges
    policy: SpecPolicy = SpecPolicy()  # the owner's --allow-extra-arg (and roots): judged as the reconciler judges

    @property
    def tick(self) -> float:
        return max(0.05, min(1.0, self.renew_interval / 2))


class Fleet(Placer):
    """This Mac's view of the fleet, and the gate the reconciler asks (placement: `Placer`)."""

    def __init__(self, settings: FleetSettings, *, leases, isvcs, models, static: Allowlist, memory, model_files,
                 events, version: str, namespaces: tuple[str, ...] | None, state_dir: Path,
                 on_key: Callable[[str], None] = lambda key: None,
                 process_ready: Callable[[str], bool] = lambda key: False,
                 announced: Callable[[str], bool] = lambda key: False,
                 waiting: Callable[[str], str | None] = lambda key: None) -> None:
        self.s = settings
        self.me = settings.member
        self.leases = leases
        self.isvcs, self.models = isvcs, models
        self.static = static
        self.entries = static.entries
        self.memory = memory
        self.model_files = model_files
        self.events = events
        self.version = version
        self.namespaces = namespaces
        self.on_key = on_key
        self.process_ready = process_ready
        self.announced = announced  # our slice for the service is in the cluster, saying ready
        self.waiting = waiting
        self.registrar = None  # set by the composition root (the registrar needs `holds` first)
        self.members: dict[str, MemberInfo] = {}
        self.replicas: dict[str, Replica] = {}  # by Lease name
        self.liveness = Liveness()
        self.last_renewed: float | None = None
        self._last_attempt = float("-inf")
        self._renewing: asyncio.Task | None = None
        self._cordon_file = state_dir / "fleet-cordoned"
        self.cordoned = self._cordon_file.exists()
        self.unfit: dict[str, tuple[str, int]] = {}  # key -> (why, committed bytes when judged)
        self.reserved: dict[str, int] = {}  # won, not yet admitted by the reconciler
        # per free replica: since when we wait, and at which place in line (a new place restarts the wait)
        self._free_since: dict[tuple[str, int], tuple[float, float]] = {}
        self._bidding: asyncio.Task | None = None  # one bid at a time: each win changes the numbers
        self._tasks: dict[tuple[str, int], asyncio.Task] = {}
        self._alive_before: set[str] = set()
        self._served: set[str] = set()
        self._parse_cache: dict[tuple, tuple[tuple, Any]] = {}
        self._unplaced: dict[str, Blocker] = {}
        self._desired: dict[str, int] = {}  # replicas wanted, per service
        self._reporters: dict[str, str | None] = {}  # who speaks for a service no Mac serves
        self._said: dict[str, Condition | None] = {}  # the placement each service's status last heard of
        self._leases_synced = False
        self._own_rv: str | None = None
        self._published: tuple = ()
        self.renew_failures = 0  # in a row
        self.renewals = {"ok": 0, "failed": 0}  # since start, for /metrics

    # -- the gate (core.claim.Allowlist's protocol) ---------------------------

    def ready(self) -> bool:
        return self._leases_synced and self.last_renewed is not None

    def refusal(self, namespace: str, name: str) -> str | None:
        if why := self.static.refusal(namespace, name):
            return why
        key = f"{namespace}/{name}"
        if self.serves(key):
            return None
        holders = sorted({r.holder for r in self._replicas_of(key) if r.holder and self._alive(r.holder)})
        if self.fenced() and any(r.holder == self.me for r in self._replicas_of(key)):
            return f"this Mac ({self.me}) could not renew its fleet Lease in time; it stopped serving {key}"
        return (f"served by {', '.join(holders)}, not by this Mac ({self.me})" if holders
                else f"not placed on this Mac ({self.me})")

    def admits(self, namespace: str, name: str) -> bool:
        return self.refusal(namespace, name) is None

    def speaks_for(self, key: str) -> bool:
        """One Mac writes a service's status: the holder of its lowest live replica, or, while
        none serves it, the member that reports it unplaced."""
        live = sorted((r.index, r.holder) for r in self._replicas_of(key) if r.holder and self._alive(r.holder))
        if live:
            return live[0][1] == self.me and not self.fenced()
        return key in self._unplaced or self._keeps_stopped(key)

    def _keeps_stopped(self, key: str) -> bool:
        """A service scaled to zero (or suspended) is nobody's replica: one Mac, the reporter,
        takes it as its own so that its status says Stopped/Suspended."""
        return self._desired.get(key) == 0 and self._reporters.get(key) == self.me and not self.fenced()

    def unplaced(self, key: str) -> Blocker | None:
        return self._unplaced.get(key)

    def placement(self, key: str) -> tuple[Condition | None, int]:
        """Which Mac serves each replica (`FleetPlacement`), and how many are ready elsewhere."""
        now = time.monotonic()
        holders: dict[int, tuple[str, bool]] = {}
        elsewhere = 0
        for r in self._replicas_of(key):
            if not r.holder or not self._alive(r.holder, now):
                continue
            if r.holder == self.me:
                ready = self.process_ready(key)
            else:
                info = self.members.get(r.holder)
                ready = info is not None and f"{key}#{r.index}" in info.serving
                elsewhere += ready
            holders[r.index] = (r.holder, ready)
        unplaced = self._unplaced.get(key)
        replicas = self._replicas_now(key)
        replicas = max(holders, default=-1) + 1 if replicas is None else replicas
        if replicas == 0:
            return None, 0
        return placement_condition(replicas, holders, unplaced.message if unplaced else None), elsewhere

    # -- what this Mac holds ------------------------------------------------

    def fenced(self, now: float | None = None) -> bool:
        if self.last_renewed is None:
            return True
        return (now or time.monotonic()) > fence_deadline(self.last_renewed, self.s.lease_duration, self.s.renew_interval)

    def holds(self, key: str) -> bool:
        """Does this Mac hold (not just succeed to) a replica of `key`, with a live Lease?"""
        return not self.fenced() and any(r.holder == self.me for r in self._replicas_of(key))

    def serves(self, key: str) -> bool:
        """Should this Mac run `key`: it holds a replica, or takes one over from a draining Mac."""
        if self.fenced():
            return False
        if self._keeps_stopped(key):
            return True
        return any(r.holder == self.me or (r.successor == self.me and r.holder and self._alive(r.holder))
                   for r in self._replicas_of(key))

    def _replicas_of(self, key: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.key == key]

    def _alive(self, member: str, now: float | None = None) -> bool:
        if member == self.me:
            return not self.fenced(now)
        return member in self.members and self.liveness.alive(member, now or time.monotonic())

    # -- the lease watch ------------------------------------------------------

    def on_lease_change(self, old: dict | None, new: dict | None) -> None:
        obj = new or old
        name = (obj.get("metadata") or {}).get("name") or ""
        if role(obj) == "member":
            info = parse_member(new) if new is not None else None
            if info is None:
                gone = (parse_member(old) if old else None)
                if gone is not None:
                    self.members.pop(gone.member.name, None)
                    self.liveness.forget(gone.member.name)
            else:
                self.members[info.member.name] = info
                spec = new.get("spec") or {}
                self.liveness.observe(info.member.name, (new.get("metadata") or {}).get("resourceVersion") or "",
                                      float(spec.get("leaseDurationSeconds") or self.s.lease_duration), time.monotonic())
        elif role(obj) == "replica":
            replica = parse_replica(new) if new is not None else None
            if replica is None:
                self.replicas.pop(name, None)
            else:
                self.replicas[name] = replica
        self._notify()

    def on_leases_synced(self) -> None:
        self._leases_synced = True
        self._notify()

    def _adopt(self, obj: dict | None) -> None:
        """A write of ours that succeeded: known now, not one watch event later."""
        if obj is not None and (replica := parse_replica(obj)) is not None:
            self.replicas[replica.lease_name] = replica
            self._notify()

    def _notify(self) -> None:
        """Re-queue every service whose "ours?" answer changed."""
        served = {r.key for r in self.replicas.values() if self.serves(r.key)} | \
            {k for k in self._desired if self._keeps_stopped(k)}
        for key in served ^ self._served:
            self.on_key(key)
        self._served = served

    # -- membership -----------------------------------------------------------

    def my_info(self) -> MemberInfo:
        committed = dict(self.memory.committed)
        budget = memory_budget(None, self.s.total_ram, self.s.agent_fraction).bytes if self.s.total_ram else 0
        unfit = {k: why for k, (why, _) in self.unfit.items()}
        member = Member(name=self.me, labels=self.s.labels, cordoned=self.cordoned, budget_bytes=budget,
                        committed_bytes=sum(committed.values()) + sum(self.reserved.values()),
                        models=frozenset(self._models_present()), allowlist=self.static.entries, unfit=unfit)
        serving = tuple(sorted(f"{r.key}#{r.index}" for r in self.replicas.values()
                               if r.holder == self.me and self.process_ready(r.key)))
        return MemberInfo(member, host=self.s.host, chip=self.s.chip, total_bytes=self.s.total_ram,
                          serving=serving, version=self.version)

    def _models_present(self) -> set[str]:
        """The Metal Models whose file is on this disk (a stat each; parsed once per version)."""
        present = set()
        for raw in self.models.items():
            meta = raw.get("metadata") or {}
            key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
            model = self._parsed(("model", key), (meta.get("resourceVersion"),), lambda: parse_model(raw))
            if isinstance(model, Parsed) and model.value.spec.hardware.accelerator.value == "metal" and \
                    self.model_files.present(model.value) is not None:
                present.add(key)
        return present

    def _parsed(self, key: tuple, version: tuple, parse: Callable[[], Any]) -> Any:
        """`parse()` once per object version: a tick must cost nothing while nothing changes."""
        if len(self._parse_cache) > 2 * (len(self.isvcs.cache) + len(self.models.cache)) + 64:
            self._parse_cache.clear()  # deleted objects' entries: start over now and then
        cached = self._parse_cache.get(key)
        if cached is None or cached[0] != version:
            cached = self._parse_cache[key] = (version, parse())
        return cached[1]

    def _fingerprint(self) -> tuple:
        serving = frozenset(r.key for r in self.replicas.values() if r.holder == self.me and self.process_ready(r.key))
        committed = sum(self.memory.committed.values()) + sum(self.reserved.values())
        return (frozenset(self._models_present()), frozenset(self.unfit), self.cordoned, serving, committed)

    async def renew(self) -> None:
        started = time.monotonic()
        self._published = self._fingerprint()
        body = member_lease(self.my_info(), duration_s=max(1, round(self.s.lease_duration)),
                            now=dt.datetime.now(dt.timezone.utc))
        try:
            written = await self.leases.put(body, self._own_rv)
            self._own_rv = (written.get("metadata") or {}).get("resourceVersion")
        except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            self._own_rv = None  # read it afresh next time
            self.renew_failures += 1
            self.renewals["failed"] += 1
            log.warning("fleet lease renewal failed", member=self.me, error=f"{type(err).__name__}: {err}",
                        serving_for_s=round(fence_deadline(self.last_renewed, self.s.lease_duration, self.s.renew_interval)
                                            - time.monotonic(), 1) if self.last_renewed else None)
            return
        if self.last_renewed is not None and self.fenced(started):
            # Back after a fence: our watch may still show replicas that moved while we were
            # away. Read them afresh before serving anything again.
            try:
                fresh = await self.leases.list(f"{ROLE_LABEL}={REPLICA_ROLE}")
            except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                log.warning("could not re-read the replica leases; staying fenced", error=f"{type(err).__name__}: {err}")
                return
            self.replicas = {r.lease_name: r for r in map(parse_replica, fresh) if r is not None}
            log.info("fleet lease renewed after a fence; replicas re-read", member=self.me,
                     holds=sorted(f"{r.key}#{r.index}" for r in self.replicas.values() if r.holder == self.me))
        elif self.last_renewed is None:
            log.info("fleet lease renewed", member=self.me, namespace=self.s.namespace)
        self.renew_failures = 0
        self.renewals["ok"] += 1
        self.last_renewed = started
        self._notify()

    # -- drain ----------------------------------------------------------------

    async def set_cordoned(self, cordoned: bool) -> None:
        self.cordoned = cordoned
        if cordoned:
            await asyncio.to_thread(self._cordon_file.write_text, "drained with `metal-agent drain`\n")
        else:
            await asyncio.to_thread(self._cordon_file.unlink, True)
        log.info("cordoned: handing replicas over and taking no new ones" if cordoned else "uncordoned", member=self.me)
        await self.renew()

    def alive_members(self, now: float | None = None, *, me: bool = True) -> list[Member]:
        """Placement's view: every member whose Lease is live (ourselves from our own numbers)."""
        now = now or time.monotonic()
        members = [info.member for name, info in self.members.items() if name != self.me and self._alive(name, now)]
        if me and not self.fenced(now):
            members.append(self.my_info().member)
        return members

    def wanted_services(self) -> list[tuple[Wanted, Any]]:
        """Every Metal service with a valid spec, as placement reads it, with its workload."""
        return [found for raw in self.isvcs.items() if (found := self._wanted(raw)) is not None]

    def _wanted(self, raw: dict) -> tuple[Wanted, Any] | None:
        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        version = tuple((o or {}).get("metadata", {}).get("resourceVersion") for o in (raw, model_raw))
        meta = raw.get("metadata") or {}
        draft_ref = wanted_draft(raw)
        draft = self.models.get(f"{draft_ref[0]}/{draft_ref[1]}") if draft_ref else None
        version += ((draft or {}).get("metadata", {}).get("resourceVersion"),)
        verdict = self._parsed(("isvc", f"{meta.get('namespace', '')}/{meta.get('name', '')}"), version,
                               lambda: evaluate(raw, model_raw, Allowlist(), self.s.default_engine, draft,
                                                self.s.policy))
        if not isinstance(verdict, Parsed):
            return None
        spec = verdict.value.isvc.spec
        return wanted_from(raw, f"{ref[0]}/{ref[1]}", spec.replicas if spec.wants_process else 0), verdict.value

    def _replicas_now(self, key: str) -> int | None:
        """The replicas `key` wants per the informer now, not as of placement's last tick: the
        status written for a scale must count with the new number (with the old one, a scale
        from 3 to 2 said "1 replica unplaced" once the third was released, then took it back)."""
        raw = self.isvcs.get(key)
        found = self._wanted(raw) if raw is not None else None
        return found[0].replicas if found else self._desired.get(key)

    def replicas_held(self, member: str) -> list[Replica]:
        return sorted((r for r in self.replicas.values() if r.holder == member), key=lambda r: (r.key, r.index))

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                # What others rank us by changed (a model now on disk, a refusal): say it now, not
                # at the next renewal, so the Mac that should win a bid is known to before it starts.
                news = self._fingerprint() != self._published
                if (news or now - self._last_attempt >= self.s.renew_interval) and \
                        (self._renewing is None or self._renewing.done()):
                    self._last_attempt = now
                    self._renewing = asyncio.create_task(self.renew(), name="fleet-renew")
                self._notify()  # a fence that just fell stops what we serve
                self._tasks = {slot: task for slot, task in self._tasks.items() if not task.done()}
                if self.ready():
                    if not self.fenced(now):  # cut off ourselves, everyone looks dead: judge nobody
                        self._notice_deaths(now)
                    self._place_all(now)
                await asyncio.sleep(self.s.tick)
        finally:
            pending = [t for t in [self._renewing, *self._tasks.values()] if t is not None and not t.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _spawn(self, slot: tuple[str, int], coro) -> None:
        task = self._tasks.get(slot)
        if task is not None and not task.done():
            coro.close()
            return
        self._tasks[slot] = asyncio.create_task(self._guarded(slot, coro), name=f"fleet {slot[0]}#{slot[1]}")

    async def _guarded(self, slot: tuple[str, int], coro) -> None:
        try:
            await coro
        except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            log.warning("fleet lease write failed; the next tick retries", slot=f"{slot[0]}#{slot[1]}",
                        error=f"{type(err).__name__}: {err}")
