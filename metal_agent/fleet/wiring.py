"""Composition of fleet mode (`run --fleet`): labels, settings, and the parts built in dependency order.

Built by the composition root (`app.build`) only for `run --fleet`, so the
single-Mac agent stays as it was: without `--fleet` none of this is built, no
Lease is read or written, and the agent makes exactly the calls it made before.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable

from metal_agent.adapters.kube.fleet_registrar import FleetRegistrar
from metal_agent.adapters.kube.informer import CustomResource, Informer
from metal_agent.adapters.kube.leases import LeaseClient
from metal_agent.core.claim import Allowlist
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.leases import COORDINATION, member_name
from metal_agent.core.memory import GiB
from metal_agent.core.placement import CHIP_LABEL, HOSTNAME_LABEL, MEMORY_LABEL
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.fleet.demand import Demand
from metal_agent.fleet.gate import FleetGate
from metal_agent.fleet.loop import FleetLoop
from metal_agent.fleet.membership import LocalMember, Membership
from metal_agent.fleet.metrics import FleetCollector
from metal_agent.fleet.placer import Placer
from metal_agent.fleet.ports import (
    EventSink,
    LeasePort,
    MemoryPort,
    ModelFilesPort,
    ObjectCache,
    Slices,
)
from metal_agent.fleet.settings import FleetSettings
from metal_agent.fleet.view import FleetView

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def parse_labels(values: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--label k=v` values (each may hold several, comma-separated). Raises ValueError naming the bad one."""
    labels: dict[str, str] = {}
    for value in values:
        for item in (i.strip() for i in value.split(",")):
            if not item:
                continue
            key, sep, val = item.partition("=")
            if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(val):
                raise ValueError(f"{item!r} is not a valid label KEY=VALUE (Kubernetes label syntax)")
            labels[key] = val
    return labels


def _label_value(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


def member_labels(member: str, chip: str, total_ram: int, user: dict[str, str]) -> dict[str, str]:
    """The well-known labels, then the user's own (which win: a user may say what chip it is)."""
    labels = {HOSTNAME_LABEL: member, MEMORY_LABEL: str(total_ram // GiB)}
    if chip_value := _label_value(chip):
        labels[CHIP_LABEL] = chip_value
    return {**labels, **user}


@dataclass(frozen=True)
class FleetParts:
    """The fleet, built: what the rest of the agent is handed (the gate, the registrar, the
    HTTP view, the loops to supervise) and the parts themselves, for tests."""

    settings: FleetSettings
    demand: Demand
    local: LocalMember
    membership: Membership
    gate: FleetGate
    registrar: FleetRegistrar | Slices
    placer: Placer
    loop: FleetLoop
    view: FleetView
    watch: Informer | None = None  # the lease watch (None: the caller runs its own)

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The fleet's long-lived coroutines by name, for `tasks.supervised_loop`."""
        return {**({"watch-leases": self.watch.run} if self.watch is not None else {}), "fleet": self.loop.run}


def assemble(settings: FleetSettings, *, leases: LeasePort, synced: asyncio.Event, isvcs: ObjectCache,
             models: ObjectCache, allowlist: Allowlist, memory: MemoryPort, model_files: ModelFilesPort,
             events: EventSink, version: str, state_dir: Path, on_key: Callable[[str], None],
             process_ready: Callable[[str], bool], waiting: Callable[[str], str | None],
             registrar: Callable[[FleetGate], Slices], now: Callable[[], float] = time.monotonic) -> FleetParts:
    """Every part, each handed what it uses, in dependency order (the registrar needs the gate's
    `serves`, placement needs the registrar)."""
    demand = Demand(settings, isvcs=isvcs, models=models, model_files=model_files)
    local = LocalMember(settings, memory=memory, demand=demand, allowlist=allowlist.entries,
                        process_ready=process_ready, cordon_file=state_dir / "fleet-cordoned", version=version)
    membership = Membership(settings, leases=leases, local=local, synced=synced, now=now)
    gate = FleetGate(membership, allowlist=allowlist, demand=demand, process_ready=process_ready, on_key=on_key,
                     now=now)
    slices = registrar(gate)
    placer = Placer(settings, membership=membership, gate=gate, local=local, demand=demand, leases=leases,
                    slices=slices, memory=memory, model_files=model_files, events=events, waiting=waiting,
                    on_key=on_key, now=now)
    loop = FleetLoop(settings, membership=membership, gate=gate, placer=placer, now=now)
    return FleetParts(settings, demand, local, membership, gate, slices, placer, loop,
                      FleetView(membership, demand, gate))


def settings_from(cfg, *, host: str, chip: str, total_ram: int, launch: LaunchSettings | None = None) -> FleetSettings:
    """The fleet's settings from the agent's nested configuration and this Mac's facts.

    `cfg` is an `app.config.AgentConfig`, read but not imported (the fleet ranks below the
    app): its `fleet` group, and the memory share, default engine, spec policy and watched
    namespaces the reconciler is given too, so the fleet judges a service as the reconciler will;
    `launch` is the reconciler's own launch settings (what the installed servers accept).
    """
    fleet = cfg.fleet
    name = fleet.member_name or member_name(host)
    return FleetSettings(
        member=name, namespace=fleet.namespace, labels=member_labels(name, chip, total_ram, dict(fleet.labels)),
        lease_duration=fleet.lease_duration, renew_interval=fleet.lease_renew_interval, bid_step=fleet.bid_step,
        host=host, chip=chip, total_ram=total_ram, agent_fraction=cfg.memory.fraction,
        default_engine=cfg.engines.default_runtime,
        # The reconciler's own policy (its default keeps model sources in the model store): a Mac
        # must not bid for a service its reconciler would refuse as SourceNotAllowed.
        policy=launch.policy if launch is not None else (cfg.controller.policy or SpecPolicy()),
        namespaces=tuple(cfg.kube.namespaces or ()) or None, launch=launch,
    )


def build_fleet(cfg, api, *, host: str, chip: str, total_ram: int, version: str, isvcs: Informer, models: Informer,
                memory: MemoryPort, model_files: ModelFilesPort, events: EventSink, on_key: Callable[[str], None],
                process_ready: Callable[[str], bool], waiting: Callable[[str], str | None],
                address: Callable[[], str | None], state_dir: Path, registrar_kwargs: dict,
                registry=None, launch: LaunchSettings | None = None) -> FleetParts:
    """Fleet mode against the cluster: the Lease client, the parts, the registrar, the lease watch."""
    settings = settings_from(cfg, host=host, chip=chip, total_ram=total_ram, launch=launch)
    synced = asyncio.Event()

    def registrar(gate: FleetGate) -> FleetRegistrar:
        return FleetRegistrar(api, agent_version=version, member=settings.member, holds=gate.serves,
                              exists=lambda key: isvcs.get(key) is not None, address=address, **registrar_kwargs)

    leases = LeaseClient(api, settings.namespace, timeout=max(1.0, settings.renew_interval))
    parts = assemble(settings, leases=leases, synced=synced, isvcs=isvcs, models=models,
                     allowlist=Allowlist(cfg.controller.allowlist), memory=memory, model_files=model_files, events=events, version=version, state_dir=state_dir, on_key=on_key,
                     process_ready=process_ready, waiting=waiting, registrar=registrar)
    if registry is not None:
        registry.register(FleetCollector(parts.membership))
    informer = Informer(api, CustomResource(*COORDINATION), parts.gate.on_lease_change,
                        namespaces=(settings.namespace,), resync_period=cfg.kube.resync_period, synced=synced)
    return replace(parts, watch=informer)
