"""The agent's side of the front door, built in one place (`--front-door`).

Parts, each handed what it needs at construction: the stable ports (the
publisher asks them), the control-socket client, the table pusher (the runner
tells it after each reconcile), the supervised front door process (it tells
the pusher when it (re)starts), and the agent's own socket answering the
front door's token reviews. `status_routes` and `metrics_text` are what the
agent's HTTP side shows of it.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import structlog

from metal_agent.adapters.agent_socket import AgentSocket
from metal_agent.adapters.front_door_client import FrontDoorClient, FrontDoorUnavailable
from metal_agent.adapters.port_book_file import PortBookFile
from metal_agent.adapters.process.front_door_process import FrontDoorProcess
from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.app.config import AgentConfig
from metal_agent.app.front_door_drain import Drainer
from metal_agent.controller.access import AccessSource
from metal_agent.controller.front_door_table import TablePusher, TableSettings, compute_table, gather
from metal_agent.controller.on_demand import OnDemand
from metal_agent.controller.publishing import HostAddress
from metal_agent.controller.rebind import Rebinder
from metal_agent.controller.stable_ports import StablePorts
from metal_agent.core.backoff import Backoff

log = structlog.get_logger(__name__)

SOCKET = "front-door.sock"
AGENT_SOCKET = "agent.sock"
LOOPBACK = "127.0.0.1"  # engines listen here when the front door is on: only it reaches them
SETTLE_TIMEOUT_S = 2.0  # an on-demand unload waits this long at most for the front door to hold requests


def front_door_argv(cfg: AgentConfig) -> tuple[str, ...]:
    """The same python as the agent (so an upgrade of the venv upgrades both)."""
    state = cfg.paths.state
    base = cfg.front_door.command or (sys.executable, "-m", "metal_agent", "front-door")
    return (*base, "--socket", str(state / SOCKET), "--state-dir", str(state))


@dataclass
class FrontDoorParts:
    ports: StablePorts
    client: FrontDoorClient
    pusher: TablePusher
    process: FrontDoorProcess
    socket: AgentSocket
    access: AccessSource
    drain: Drainer
    rebind: Rebinder
    on_demand: OnDemand

    async def routed(self, key: str) -> bool:
        """Does the front door listen on `key`'s port: is the route in the last table it accepted,
        or (nothing pushed yet since the agent started) in the one it serves, e.g. an adopted front
        door's persisted table? A front door that does not answer listens on nothing."""
        pushed = self.pusher.pushed
        if pushed is not None and any(r.get("key") == key for r in pushed.get("routes", ())):
            return True
        self.pusher.changed()
        if pushed is not None:
            return False
        try:
            serving = (await self.client.state()).get("routes") or {}
        except FrontDoorUnavailable:
            return False
        return isinstance(serving, dict) and key in serving

    async def status_routes(self) -> list[dict]:
        """One row per route: its port and state from the table, in flight/queued from the front door."""
        try:
            live = (await self.client.state()).get("routes") or {}
        except FrontDoorUnavailable:
            live = {}
        rows = []
        for route in self.pusher.current().get("routes", ()):
            now = live.get(route["key"]) if isinstance(live, dict) else None
            now = now if isinstance(now, dict) else {}
            rows.append({"service": route["key"], "port": route["port"],
                         "state": self.on_demand.label(route["key"], route["state"]),
                         "upstream": route["upstream"], "inflight": now.get("inflight"), "queued": now.get("queued")})
        return rows


class PowerFeed:
    """Each power sample's window and energy, handed to the front door, which splits it across
    the requests in flight during it (frontdoor/energy.py). One push per sample, and only with
    the power sampler on (a Mac with the sudo grant). A push the front door misses is that
    window's energy left unattributed, never retried late (it would land on the wrong requests)."""

    def __init__(self, client: FrontDoorClient, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self._sending: asyncio.Task | None = None

    def __call__(self, sample: object) -> None:
        from metal_agent.core.energy import sample_energy

        end = time.monotonic()
        energy = sample_energy(sample, self.interval_s)  # type: ignore[arg-type]
        if self._sending is not None and not self._sending.done():
            return  # the front door is slow: skip rather than queue windows up
        self._sending = asyncio.get_running_loop().create_task(
            self._send(end - energy.seconds, end, energy.joules["combined"]))

    async def _send(self, start: float, end: float, joules: float) -> None:
        try:
            await self.client.put_power(start, end, joules)
        except FrontDoorUnavailable:
            pass  # away or restarting: this window goes unattributed


class MetricsAppender:
    """The front door's own /metrics, fetched when the agent's are scraped. A front door that
    does not answer adds nothing, and says so in the log once until it answers again."""

    def __init__(self, client: FrontDoorClient) -> None:
        self.client = client
        self._silent = False

    async def __call__(self) -> str:
        try:
            text = await self.client.metrics()
        except FrontDoorUnavailable as err:
            if not self._silent:
                self._silent = True
                log.warning("the front door's metrics are not available; scrapes show the agent's alone",
                            error=str(err))
            return ""
        self._silent = False
        return text


def build_front_door(cfg: AgentConfig, *, address: HostAddress, isvcs: Mapping[str, dict],
                     managed: Mapping[str, object], supervisors: Callable[[], Mapping[str, object]],
                     access: AccessSource, dirty: asyncio.Event, events, enqueue: Callable[[str], None],
                     on_move: Callable[[str, str], None]) -> FrontDoorParts:
    """`supervisors()`: the process manager's table; `access`: who may call (its policy and each
    service's key digests travel in the table; it answers the front door's token reviews);
    `dirty`: set by whatever the table is made of, the access sources included; `events` and
    `enqueue`: for load on demand (it records loads and unloads, and queues the key to act) and the
    rebinder, with `on_move` (an older agent's engines moved onto loopback, controller/rebind.py)."""
    fd, state = cfg.front_door, cfg.paths.state
    ports = StablePorts(PortBookFile(state), host=lambda: address.registered or LOOPBACK)
    settings = TableSettings(client_port=fd.client_port, queue=fd.queue, queue_timeout_s=fd.queue_timeout)

    client = FrontDoorClient(state / SOCKET)
    def sleeping(key: str) -> Callable[[dict], bool]:
        return lambda table: any(r.get("key") == key and r.get("state") == "sleeping" for r in table.get("routes", ()))

    async def settle(key: str) -> bool:  # the pusher is built below, before anything calls this
        return await pusher.wait_for_table(sleeping(key), SETTLE_TIMEOUT_S)

    on_demand = OnDemand(enabled=True, events=events, isvcs=isvcs, running=managed, enqueue=enqueue,
                         activity=client.state, changed=dirty.set, settle=settle)

    def compute() -> dict:
        sups = supervisors()
        facts = drain.facts(gather(ports.book.ports, isvcs, managed, sups, on_demand.route_state), sups)
        # --bind-all: what listened on every address without the front door (the engines) now sits
        # behind it, so the front door does (who may call is still its access decision).
        listen = "0.0.0.0" if cfg.registration.bind_all else address.registered or LOOPBACK
        return compute_table(facts, listen_host=listen, settings=settings,
                             access=access.policy().to_json(), keys=lambda key: access.keys(key).to_json(),
                             held=rebind.holding)

    pusher = TablePusher(client, compute, dirty=dirty)
    drain = Drainer(client, pusher, supervisors)
    rebind = Rebinder(bind=lambda: address.bind, supervisors=supervisors, state=client.state,
                      pushed=lambda: pusher.pushed, changed=pusher.changed, enqueue=enqueue, on_move=on_move,
                      replacing=drain.replacing)
    process = FrontDoorProcess(front_door_argv(cfg), state_dir=state, log_path=cfg.paths.logs / "front-door.log",
                               healthy=client.healthy, on_start=pusher.resend,
                               backoff=Backoff(initial=0.2, factor=2.0, cap=fd.restart_backoff_cap, reset_after=60.0))
    socket = AgentSocket(state / AGENT_SOCKET, access.answer, on_demand.wake)
    return FrontDoorParts(ports, client, pusher, process, socket, access, drain, rebind, on_demand)


def supervision_for(cfg: AgentConfig) -> SupervisorSettings:
    """Behind the front door, the supervisors' quick readiness probes (every 0.5 s, the bulk of
    an idle agent's CPU with many services) give way to the front door's passive health: it
    sees every request, takes an engine that fails one out at once and one that leaves a
    request without an answer out within a second (frontdoor/outlier.py), and costs nothing
    while idle. What remains is the liveness probe (restarts, and the status of an engine
    nobody is calling); without the front door nothing changes, since the slices point at the
    engines themselves and only the readiness probe takes a hung one out of them."""
    s = cfg.supervisor
    if not cfg.front_door.enabled:
        return s
    return replace(s, readiness_interval=max(s.readiness_interval, s.liveness_interval))


def bind_for(enabled: bool, bind_all: bool) -> Callable[[str], str]:
    """Where engines listen for a registered address: loopback behind the front door."""
    from metal_agent.core.host_address import bind_address

    if enabled:
        return lambda _address: LOOPBACK
    return functools.partial(bind_address, bind_all=bind_all)
