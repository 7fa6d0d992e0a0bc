"""The front door's routing table: computed from what the controller knows, pushed on change.

`compute_table` is pure: the facts in, the table's JSON out (the shape in
core/front_door.py, owned by the front door). `TablePusher` recomputes after
every reconcile (the runner calls `changed()`, which only sets a flag, so a
reconcile never waits on the front door), debounces bursts, bumps the version
only when the content changed, and sends again when the front door restarts
or did not answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

import structlog

from metal_agent.core.backoff import Backoff

log = structlog.get_logger(__name__)

PUSH_BACKOFF = Backoff(initial=0.1, factor=2.0, cap=5.0)


@dataclass(frozen=True)
class RouteFacts:
    """What the controller knows of one service with a stable port."""

    key: str
    port: int
    engine_port: int | None  # where its engine listens on 127.0.0.1 (None: no process)
    ready: bool  # the engine answers its health check
    running: bool  # a process is supervised (starting, ready, or restarting)
    max_inflight: int  # the engine's parallel slots


@dataclass(frozen=True)
class TableSettings:
    client_port: int = 9999
    queue: int = 64
    queue_timeout_s: float = 30.0


def route_state(f: RouteFacts) -> str:
    if f.ready and f.engine_port:
        return "serving"
    return "starting" if f.running else "stopped"


def compute_table(facts: Iterable[RouteFacts], *, listen_host: str, settings: TableSettings,
                  access: dict | None = None, keys: Callable[[str], dict | None] | None = None) -> dict:
    """The table without its version (the pusher numbers it). `access`/`keys(key)`: the
    access policy's and each service's key digests' JSON, opaque here; omitted when None."""
    routes = []
    for f in sorted(facts, key=lambda f: f.key):
        state = route_state(f)
        route = {"key": f.key, "model": f.key.split("/", 1)[1], "port": f.port,
                 "upstream": f"127.0.0.1:{f.engine_port}" if state == "serving" else None,
                 "state": state, "max_inflight": max(1, f.max_inflight), "queue": settings.queue,
                 "queue_timeout_s": settings.queue_timeout_s}
        if keys is not None and (k := keys(f.key)) is not None:
            route["access"] = k
        routes.append(route)
    table = {"listen_host": listen_host, "client_port": settings.client_port, "routes": routes}
    if access is not None:
        table["access"] = access
    return table


class _Supervised(Protocol):
    plan: object
    snapshot: object


def gather(ports: Mapping[str, int], isvcs: Mapping[str, dict], managed: Mapping[str, object],
           supervisors: Mapping[str, _Supervised]) -> list[RouteFacts]:
    """Each service with a stable port whose InferenceService exists, as the controller sees it now."""
    found = []
    for key, port in ports.items():
        if key not in isvcs:
            continue
        sup = supervisors.get(key)
        snap = getattr(sup, "snapshot", None)
        workload = getattr(managed.get(key), "workload", None)
        slots = workload.isvc.spec.parallel_slots if workload is not None else 1
        found.append(RouteFacts(key=key, port=port, engine_port=getattr(snap, "port", None),
                                ready=bool(snap is not None and snap.ready), running=sup is not None,
                                max_inflight=slots))
    return found


class TableClient(Protocol):
    async def put_table(self, table: dict) -> None: ...
    async def state(self) -> dict: ...


class TablePusher:
    def __init__(self, client: TableClient, compute: Callable[[], dict], *, debounce: float = 0.005,
                 backoff: Backoff = PUSH_BACKOFF, dirty: asyncio.Event | None = None) -> None:
        """`dirty`: set by anything the table is made of (e.g. the access sources, built before the
        pusher); `changed()` sets it too."""
        self.client = client
        self.compute = compute
        self.debounce = debounce
        self.backoff = backoff
        self.version = 0
        self.pushed: dict | None = None  # the last table the front door accepted (with its version)
        self._content: dict | None = None  # the last computed content (without version)
        self._dirty = dirty if dirty is not None else asyncio.Event()
        self._armed = asyncio.Event()
        self._resend = True  # first push: learn the front door's version, then send
        self.pushes = 0
        self.rounds = 0  # completed attempts, pushed or not (tests wait on it)

    def changed(self, *_: object) -> None:
        """Something the table is made of may have changed. Never blocks, never fails."""
        self._dirty.set()

    def resend(self) -> None:
        """The front door (re)started: it serves its persisted table; send ours again."""
        self._resend = True
        self._dirty.set()

    def arm(self) -> None:
        """The controller has reconciled every service once: its picture is whole, push it.
        Before that the caches may be empty, and an empty table would make the front door a
        previous agent left serving drop every route."""
        self._armed.set()

    def current(self) -> dict:
        return {"version": self.version, **(self._content or {})}

    async def run(self) -> None:
        failures = 0
        await self._armed.wait()
        self._dirty.set()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # let a burst of reconciles settle into one push
            self._dirty.clear()
            try:
                await self._push_once()
                failures = 0
                self.rounds += 1
            except Exception as err:  # noqa: BLE001 - the front door away or restarting: try again
                failures += 1
                self._resend = True  # it may have restarted meanwhile: learn its version again
                delay = self.backoff.delay(failures)
                (log.warning if failures == 1 else log.debug)(
                    "could not push the front door's table; retrying", error=str(err), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                self._dirty.set()

    async def _push_once(self) -> None:
        content = self.compute()
        if self._resend:
            # Versions only grow, across agent restarts too: continue from what the front door holds.
            seen = (await self.client.state()).get("version")
            if isinstance(seen, int) and not isinstance(seen, bool) and seen >= self.version:
                self.version = seen
                self._content = None
        if content != self._content:
            self.version += 1
            self._content = content
        table = self.current()
        if not self._resend and table == self.pushed:
            return
        await self.client.put_table(table)
        self._resend = False
        self.pushed = table
        self.pushes += 1
        log.debug("front door table pushed", version=self.version, routes=len(content.get("routes", ())))
