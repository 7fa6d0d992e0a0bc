"""Drain before a deliberate stop, behind the front door (a respawn for a spec change, a stop).

Without it the engine gets SIGTERM while its route still says `serving`: the front door keeps
sending it requests on pooled connections, and llama-server, once it has begun to exit, accepts
them and never answers, so they hang until the stop's grace runs out and the engine is killed
(measured: ~10 s held per respawn under a steady load). Instead the route is pushed as
`starting` (new requests wait for the next engine), the requests in flight finish, and only
then is the engine stopped. The hold ends when another engine takes the key, or after
`hold_s` (a stop for good then shows as what it is).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Callable, Iterable, Mapping

import structlog

from metal_agent.adapters.front_door_client import FrontDoorUnavailable
from metal_agent.controller.front_door_table import RouteFacts, TableClient, TablePusher

log = structlog.get_logger(__name__)


class Drainer:
    def __init__(self, client: TableClient, pusher: TablePusher, supervisors: Callable[[], Mapping[str, object]],
                 *, timeout_s: float = 8.0, hold_s: float = 30.0, poll_s: float = 0.02,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`timeout_s`: the longest a stop waits for requests in flight (under the stop's own
        grace); `hold_s`: how long the route is held after the drain began if no new engine comes."""
        self.client = client
        self.pusher = pusher
        self.supervisors = supervisors
        self.timeout_s = timeout_s
        self.hold_s = hold_s
        self.poll_s = poll_s
        self.clock = clock
        self._held: dict[str, tuple[object, float]] = {}  # key -> (the supervisor drained, when)

    def facts(self, facts: Iterable[RouteFacts], supervisors: Mapping[str, object]) -> list[RouteFacts]:
        """The table's facts with every held route starting (no upstream, requests wait)."""
        return [replace(f, ready=False, running=True) if self._holds(f.key, supervisors.get(f.key)) else f
                for f in facts]

    def _holds(self, key: str, supervisor: object | None) -> bool:
        held = self._held.get(key)
        if held is None:
            return False
        drained, since = held
        if (supervisor is not None and supervisor is not drained) or self.clock() - since > self.hold_s:
            del self._held[key]  # a new engine took over (its own readiness decides), or none came
            return False
        return True

    async def __call__(self, key: str) -> None:
        """Hold `key`'s new requests and wait (bounded) for those in flight; never fails."""
        supervisor = self.supervisors().get(key)
        if supervisor is None:
            return
        self._held[key] = (supervisor, self.clock())
        self.pusher.changed()
        deadline = self.clock() + self.timeout_s
        while self.clock() < deadline:
            idle = await self._idle(key)
            if idle is None or (idle and not self._serving_pushed(key)):
                return  # None: no front door to drain (down or restarting), so nothing in flight through it
            await asyncio.sleep(self.poll_s)  # polls the front door; its state has no change feed
        log.info("requests still in flight after the drain; stopping the engine anyway", service=key,
                 waited_s=self.timeout_s)

    def replacing(self, key: str) -> bool:
        """The key's engine was drained for a stop and no other has taken the key yet (a respawn
        in its gap between the stop and the next start), for at most `hold_s`."""
        return self._holds(key, self.supervisors().get(key))

    def _serving_pushed(self, key: str) -> bool:
        pushed = self.pusher.pushed or {}
        return any(r.get("key") == key and r.get("state") == "serving" for r in pushed.get("routes", ()))

    async def _idle(self, key: str) -> bool | None:
        """No request in flight for `key`; None when the front door does not answer."""
        try:
            routes = (await self.client.state()).get("routes") or {}
        except FrontDoorUnavailable:
            return None
        route = routes.get(key) if isinstance(routes, dict) else None
        return not isinstance(route, dict) or not route.get("inflight")
