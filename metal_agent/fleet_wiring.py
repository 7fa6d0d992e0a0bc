"""Composition of fleet mode (`run --fleet`): the lease watch, the Fleet, its registrar, its HTTP routes.

Kept out of agent.py so that the single-Mac agent stays as it was: without
`--fleet` none of this is built, no Lease is read or written, and the agent
makes exactly the calls it made before.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from aiohttp import web

from metal_agent.adapters.kube.fleet_registrar import FleetRegistrar
from metal_agent.adapters.kube.informer import CustomResource, Informer
from metal_agent.adapters.kube.leases import LeaseClient
from metal_agent.core.claim import Allowlist
from metal_agent.core.leases import COORDINATION, member_name
from metal_agent.core.memory import GiB
from metal_agent.core.names import METRIC_PREFIX
from metal_agent.core.placement import CHIP_LABEL, HOSTNAME_LABEL, MEMORY_LABEL, rank, unschedulable_message
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.fleet import Fleet, FleetSettings

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


@dataclass
class FleetParts:
    fleet: Fleet
    registrar: FleetRegistrar
    informer: Informer

    async def run(self) -> None:
        """The lease watch and the fleet's loop; the fleet is told once the watch has listed."""
        async def synced() -> None:
            await self.informer.synced.wait()
            self.fleet.on_leases_synced()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.informer.run(), name="watch-leases")
            tasks.create_task(synced())
            tasks.create_task(self.fleet.run(), name="fleet")


def build_fleet(cfg, api, *, host: str, chip: str, total_ram: int, version: str, isvcs: Informer, models: Informer,
                memory, model_files, events: Callable[[], object], on_key: Callable[[str], None],
                process_ready: Callable[[str], bool], waiting: Callable[[str], str | None],
                address: Callable[[], str | None], state_dir: Path, registrar_kwargs: dict,
                registry=None) -> FleetParts:
    name = cfg.member_name or member_name(host)
    settings = FleetSettings(
        member=name, namespace=cfg.fleet_namespace, labels=member_labels(name, chip, total_ram, dict(cfg.labels)),
        lease_duration=cfg.lease_duration, renew_interval=cfg.lease_renew_interval, bid_step=cfg.fleet_bid_step,
        host=host, chip=chip, total_ram=total_ram, agent_fraction=cfg.memory_fraction,
        default_engine=cfg.default_runtime, policy=cfg.policy or SpecPolicy(),
    )
    fleet = Fleet(settings, leases=LeaseClient(api, cfg.fleet_namespace, timeout=max(1.0, cfg.lease_renew_interval)),
                  isvcs=isvcs, models=models, static=Allowlist(cfg.allowlist), memory=memory, model_files=model_files,
                  events=SimpleNamespace(emit=lambda *a, **k: events().emit(*a, **k)), version=version,
                  namespaces=cfg.namespaces or None, state_dir=state_dir, on_key=on_key,
                  process_ready=process_ready, waiting=waiting)
    registrar = FleetRegistrar(api, agent_version=version, member=name, holds=fleet.serves,
                               exists=lambda key: isvcs.get(key) is not None, address=address, **registrar_kwargs)
    fleet.registrar = registrar
    fleet.announced = registrar.announced
    if registry is not None:
        registry.register(FleetCollector(fleet))
    informer = Informer(api, CustomResource(*COORDINATION), fleet.on_lease_change, namespaces=(cfg.fleet_namespace,),
                        resync_period=cfg.resync_period)
    return FleetParts(fleet, registrar, informer)


def fleet_view(fleet: Fleet) -> dict:
    """What `metal-agent fleet` and `metal-agent drain` show: every member, its health, what it
    holds and serves, its memory; and, for a cordoned Mac, where each of its replicas is going."""
    now = time.monotonic()
    infos = dict(fleet.members)
    infos[fleet.me] = fleet.my_info()
    rows = []
    for name, info in sorted(infos.items()):
        m = info.member
        expires = fleet.liveness.expires_in(name, now)
        rows.append({
            "member": name, "alive": fleet._alive(name, now), "cordoned": m.cordoned, "host": info.host,
            "chip": info.chip, "labels": dict(m.labels), "total_bytes": info.total_bytes,
            "budget_bytes": m.budget_bytes, "free_bytes": m.free_bytes,
            "holds": [f"{r.key}#{r.index}" for r in fleet.replicas_held(name)],
            "ready": list(info.serving), "models": sorted(m.models), "unfit": dict(m.unfit),
            "expires_in_s": None if name == fleet.me or expires is None else round(expires, 1),
        })
    draining: dict[str, str] = {}
    if fleet.cordoned:
        wanted = {w.key: w for w, _ in fleet.wanted_services()}
        others = fleet.alive_members(now, me=False)
        for r in fleet.replicas_held(fleet.me):
            slot = f"{r.key}#{r.index}"
            holders = frozenset(x.holder for x in fleet.replicas.values()
                                if x.key == r.key and x.holder and fleet._alive(x.holder, now))
            if r.successor and fleet._alive(r.successor, now):
                draining[slot] = f"moving to {r.successor}: starting there"
            elif r.key not in wanted:
                draining[slot] = "the service is gone or invalid; released when it is deleted"
            elif candidates := rank(wanted[r.key], others, holders):
                draining[slot] = f"waiting for {candidates[0].name} to take it"
            else:
                draining[slot] = "no other Mac can take it: " + unschedulable_message(wanted[r.key], others, holders)
    return {"member": fleet.me, "namespace": fleet.s.namespace, "cordoned": fleet.cordoned,
            "fenced": fleet.fenced(now), "members": rows, "draining": draining,
            "unplaced": {k: b.message for k, b in sorted(fleet._unplaced.items())}}


class FleetCollector:
    """The fleet on /metrics, read at scrape time (nothing to keep up to date between scrapes)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        f, now = self.fleet, time.monotonic()
        held = GaugeMetricFamily(METRIC_PREFIX + "fleet_replicas_held", "replica Leases this Mac holds")
        held.add_metric([], len(f.replicas_held(f.me)))
        members = GaugeMetricFamily(METRIC_PREFIX + "fleet_members", "members of the fleet by state", labels=["state"])
        alive = sum(1 for name in f.members if name != f.me and f._alive(name, now)) + (not f.fenced(now))
        members.add_metric(["alive"], alive)
        members.add_metric(["expired"], len(set(f.members) | {f.me}) - alive)
        fenced = GaugeMetricFamily(METRIC_PREFIX + "fleet_fenced",
                                   "1 while this Mac could not renew its Lease in time (it serves nothing)")
        fenced.add_metric([], 1 if f.fenced(now) else 0)
        renewals = CounterMetricFamily(METRIC_PREFIX + "fleet_lease_renewals", "renewals of this Mac's Lease",
                                       labels=["outcome"])
        for outcome, count in f.renewals.items():
            renewals.add_metric([outcome], count)
        return [held, members, fenced, renewals]


def add_routes(app: web.Application, fleet: Fleet) -> None:
    """`GET /v1/fleet` (members, health, what each serves, what is free); `POST /v1/fleet/drain`
    and `/v1/fleet/uncordon` for the CLI commands of the same names."""

    async def view(_: web.Request) -> web.Response:
        return web.json_response(fleet_view(fleet))

    async def drain(_: web.Request) -> web.Response:
        await fleet.set_cordoned(True)
        return web.json_response(fleet_view(fleet))

    async def uncordon(_: web.Request) -> web.Response:
        await fleet.set_cordoned(False)
        return web.json_response(fleet_view(fleet))

    app.router.add_get("/v1/fleet", view)
    app.router.add_post("/v1/fleet/drain", drain)
    app.router.add_post("/v1/fleet/uncordon", uncordon)
