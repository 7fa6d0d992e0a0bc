"""The fleet over the agent's HTTP API: `GET /v1/fleet`, `POST /v1/fleet/drain` and `/v1/fleet/uncordon`.

What `metal-agent fleet` and `metal-agent drain` show, read through the
public questions of membership, placement's demand and the gate, never their
insides.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from metal_agent.core.placement import rank, unschedulable_message
from metal_agent.fleet.demand import Demand
from metal_agent.fleet.gate import FleetGate
from metal_agent.fleet.membership import Membership


@dataclass(frozen=True)
class FleetView:
    membership: Membership
    demand: Demand
    gate: FleetGate

    def render(self) -> dict:
        """Every member, its health, what it holds and serves, its memory; and, for a cordoned
        Mac, where each of its replicas is going."""
        m = self.membership
        now = m.now()
        infos = dict(m.others())
        infos[m.me] = m.my_info()
        rows = []
        for name, info in sorted(infos.items()):
            member = info.member
            expires = m.expires_in(name, now)
            rows.append({
                "member": name, "alive": m.alive(name, now), "cordoned": member.cordoned, "host": info.host,
                "chip": info.chip, "labels": dict(member.labels), "total_bytes": info.total_bytes,
                "budget_bytes": member.budget_bytes, "free_bytes": member.free_bytes,
                "holds": [f"{r.key}#{r.index}" for r in m.replicas_held(name)],
                "ready": list(info.serving), "models": sorted(member.models), "unfit": dict(member.unfit),
                "expires_in_s": None if name == m.me or expires is None else round(expires, 1),
            })
        cordoned = m.local.cordoned
        return {"member": m.me, "namespace": m.s.namespace, "cordoned": cordoned,
                "fenced": m.fenced(now), "members": rows, "draining": self._draining(now) if cordoned else {},
                "unplaced": {k: b.message for k, b in sorted(self.gate.unplaced_services().items())}}

    def _draining(self, now: float) -> dict[str, str]:
        m = self.membership
        wanted = {w.key: w for w, _ in self.demand.wanted_services()}
        others = m.alive_members(now, me=False)
        draining: dict[str, str] = {}
        for r in m.replicas_held(m.me):
            slot = f"{r.key}#{r.index}"
            holders = frozenset(x.holder for x in m.replicas_of(r.key) if x.holder and m.alive(x.holder, now))
            if r.successor and m.alive(r.successor, now):
                draining[slot] = f"moving to {r.successor}: starting there"
            elif r.key not in wanted:
                draining[slot] = "the service is gone or invalid; released when it is deleted"
            elif candidates := rank(wanted[r.key], others, holders):
                draining[slot] = f"waiting for {candidates[0].name} to take it"
            else:
                draining[slot] = "no other Mac can take it: " + unschedulable_message(wanted[r.key], others, holders)
        return draining


def add_routes(app: web.Application, view: FleetView) -> None:
    """`GET /v1/fleet` (members, health, what each serves, what is free); `POST /v1/fleet/drain`
    and `/v1/fleet/uncordon` for the CLI commands of the same names."""

    async def show(_: web.Request) -> web.Response:
        return web.json_response(view.render())

    async def drain(_: web.Request) -> web.Response:
        await view.membership.set_cordoned(True)
        return web.json_response(view.render())

    async def uncordon(_: web.Request) -> web.Response:
        await view.membership.set_cordoned(False)
        return web.json_response(view.render())

    app.router.add_get("/v1/fleet", show)
    app.router.add_post("/v1/fleet/drain", drain)
    app.router.add_post("/v1/fleet/uncordon", uncordon)
