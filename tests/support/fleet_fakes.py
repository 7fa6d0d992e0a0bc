"""Fakes for the ports the fleet's parts are handed (metal_agent/fleet/ports.py), and a clock.

`FakeLeases` keeps Leases as the API server would for the calls the fleet
makes: every write bumps a resourceVersion, a conditional write at a stale one
loses (None, as `LeaseClient.swap` answers a 409), and every change is queued
for the lease watch, which a test delivers when it chooses (`deliver`), so a
watch that lags behind the writes is as easy to set up as one that does not.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.claim import Allowlist
from metal_agent.core.leases import MemberInfo, member_lease, replica_lease
from metal_agent.core.placement import Member
from metal_agent.fleet.demand import Demand
from metal_agent.fleet.gate import FleetGate
from metal_agent.fleet.membership import LocalMember, Membership
from metal_agent.fleet.settings import FleetSettings
from metal_agent.fleet.wiring import FleetParts, assemble

WALL = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
OnChange = Callable[[dict | None, dict | None], None]


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Store(dict):
    """An informer's reads: `get(key)`, `items()` (the objects), `cache`."""

    def items(self):  # type: ignore[override]
        return list(self.values())

    @property
    def cache(self) -> dict:
        return self


@dataclass
class FakeLeases:
    leases: dict[str, dict] = field(default_factory=dict)
    pending: list[tuple[dict | None, dict | None]] = field(default_factory=list)  # not yet seen by the watch
    down: bool = False  # the API server unreachable: every call raises
    writes: list[str] = field(default_factory=list)  # Lease names, in the order written
    _rv: int = 0

    def _check(self) -> None:
        if self.down:
            raise OSError("connection refused")

    def _store(self, body: dict) -> dict:
        self._rv += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self._rv)
        name = stored["metadata"]["name"]
        self.pending.append((self.leases.get(name), stored))
        self.leases[name] = stored
        self.writes.append(name)
        return copy.deepcopy(stored)

    async def put(self, body: dict, resource_version: str | None) -> dict:
        self._check()
        return self._store(body)

    async def swap(self, body: dict) -> dict | None:
        self._check()
        name = body["metadata"]["name"]
        current = self.leases.get(name)
        wanted = body["metadata"].get("resourceVersion")
        if (current is None) != (not wanted) or (current is not None and current["metadata"]["resourceVersion"] != wanted):
            return None
        return self._store(body)

    async def resource_version(self, name: str) -> str | None:
        self._check()
        current = self.leases.get(name)
        return current["metadata"]["resourceVersion"] if current else None

    async def list(self, label_selector: str) -> list[dict]:
        self._check()
        key, _, value = label_selector.partition("=")
        return [copy.deepcopy(lease) for lease in self.leases.values()
                if (lease["metadata"].get("labels") or {}).get(key) == value]

    async def delete(self, name: str, resource_version: str) -> None:
        self._check()
        current = self.leases.get(name)
        if current is None:
            raise ApiException(status=404)
        if current["metadata"]["resourceVersion"] != resource_version:
            raise ApiException(status=409)
        del self.leases[name]
        self.pending.append((current, None))

    def deliver(self, on_change: OnChange) -> None:
        """The lease watch catches up: every change so far, in order."""
        pending, self.pending = self.pending, []
        for old, new in pending:
            on_change(copy.deepcopy(old), copy.deepcopy(new))

    def hold(self, key: str, index: int, holder: str | None, *, successor: str | None = None) -> dict:
        """Another Mac (or the test) writes a replica Lease, unconditionally."""
        body = replica_lease(key, index, holder=holder, successor=successor, duration_s=40, now=WALL)
        return self._store(body)

    def renew_other(self, name: str, **member_fields) -> dict:
        """Another Mac renews its member Lease (written as ours is, by `member_lease`)."""
        info = MemberInfo(Member(name=name, **member_fields), host=name)
        body = member_lease(info, duration_s=40, now=WALL)
        current = self.leases.get(body["metadata"]["name"])
        if current is not None:
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self._store(body)


@dataclass
class FakeMemory:
    committed: dict[str, int] = field(default_factory=dict)
    mode: str = "enforce"


@dataclass
class FakeModelFiles:
    """No model is on this disk unless a test puts its key in `on_disk`."""

    on_disk: set[str] = field(default_factory=set)

    def present(self, model) -> Path | None:
        return Path("/models/x.gguf") if model.meta.key in self.on_disk else None

    def engine_of(self, model):
        return None

    async def memory_estimate(self, path, spec, engine, model=None):
        raise AssertionError("no model is on disk in these tests")


@dataclass
class FakeEvents:
    emitted: list[tuple[str, str, str]] = field(default_factory=list)  # (object name, reason, message)

    def emit(self, obj_meta: dict, reason: str, message: str, *, warning: bool = False) -> None:
        self.emitted.append((obj_meta.get("name", ""), reason, message))


@dataclass
class FakeSlices:
    announced_keys: set[str] = field(default_factory=set)
    marked: list[str] = field(default_factory=list)

    def announced(self, key: str) -> bool:
        return key in self.announced_keys

    async def mark_member_not_ready(self, dead: str, namespaces) -> int:
        self.marked.append(dead)
        return 1


@dataclass
class Fakes:
    """Everything one fleet is handed, and what it told the reconciler."""

    clock: Clock = field(default_factory=Clock)
    leases: FakeLeases = field(default_factory=FakeLeases)
    isvcs: Store = field(default_factory=Store)
    models: Store = field(default_factory=Store)
    memory: FakeMemory = field(default_factory=FakeMemory)
    model_files: FakeModelFiles = field(default_factory=FakeModelFiles)
    events: FakeEvents = field(default_factory=FakeEvents)
    slices: FakeSlices = field(default_factory=FakeSlices)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    ready: set[str] = field(default_factory=set)  # services whose process is ready here
    waiting: dict[str, str] = field(default_factory=dict)  # the memory admission's refusals
    told: list[str] = field(default_factory=list)  # keys the reconciler was re-queued for


DEFAULTS = {"lease_duration": 40.0, "renew_interval": 10.0, "bid_step": 2.0, "total_ram": 64 << 30}


def gate_alone(fakes: Fakes, tmp_path: Path, *, member: str = "a", allowlist: Allowlist = Allowlist(),
               **settings) -> FleetGate:
    """The gate and only what it is handed (membership, this Mac's numbers, demand): no placer, no loop."""
    s = FleetSettings(member=member, **{**DEFAULTS, **settings})
    demand = Demand(s, isvcs=fakes.isvcs, models=fakes.models, model_files=fakes.model_files)
    local = LocalMember(s, memory=fakes.memory, demand=demand, allowlist=allowlist.entries,
                        process_ready=lambda key: key in fakes.ready, cordon_file=tmp_path / "fleet-cordoned",
                        version="test")
    membership = Membership(s, leases=fakes.leases, local=local, synced=fakes.synced, now=fakes.clock)
    return FleetGate(membership, allowlist=allowlist, demand=demand, process_ready=lambda key: key in fakes.ready,
                     on_key=fakes.told.append, now=fakes.clock)


def build(fakes: Fakes, tmp_path: Path, *, member: str = "a", allowlist: Allowlist = Allowlist(),
          **settings) -> FleetParts:
    """One Mac's whole fleet, built as the agent builds it (`assemble`), on fakes."""
    defaults = DEFAULTS
    state = tmp_path / member
    state.mkdir(parents=True, exist_ok=True)

    def registrar(gate: FleetGate) -> FakeSlices:
        return fakes.slices

    return assemble(FleetSettings(member=member, **{**defaults, **settings}), leases=fakes.leases,
                    synced=fakes.synced, isvcs=fakes.isvcs, models=fakes.models, allowlist=allowlist,
                    memory=fakes.memory, model_files=fakes.model_files, events=fakes.events, version="test",
                    state_dir=state, on_key=fakes.told.append, process_ready=lambda key: key in fakes.ready,
                    waiting=fakes.waiting.get, registrar=registrar, now=fakes.clock)
