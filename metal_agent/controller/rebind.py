"""Engines an agent without the front door left on the Mac's address move behind it, one at a time.

With the front door on (the default) an engine must listen on 127.0.0.1 alone, or anyone who can
route to the Mac reaches it around the door. An engine adopted from an older agent (or one run with
`--no-front-door`) listens on the Mac's address. Respawning all of them at start-up would reload
every model at once and fail the requests in flight; keeping them leaves the models open. So each
is taken over and routed through the front door at once (its slice moves to the stable port), then
moved onto loopback one service at a time: after a quiet moment (or a bounded wait for one) the
front door holds the route's new requests, the ones in flight finish, the reconciler respawns the
engine, and the held requests go to the new one when it is ready.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Mapping

import structlog

from metal_agent.adapters.process.pause_point import BEFORE_FIRST_MOVE, pause_point

log = structlog.get_logger(__name__)

QUIET_WAIT = 60.0  # seconds to wait for a moment without requests before holding them anyway
READY_WAIT = 900.0  # seconds the moved engine may take to load before the next one is moved


class Rebinder:
    def __init__(self, *, bind: Callable[[], str], supervisors: Callable[[], Mapping[str, object]],
                 state: Callable[[], Awaitable[dict]], pushed: Callable[[], dict | None],
                 changed: Callable[[], None], enqueue: Callable[[str], None],
                 on_move: Callable[[str, str], None] = lambda key, message: None,
                 replacing: Callable[[str], bool] = lambda key: False,
                 poll: float = 0.02, quiet_wait: float = QUIET_WAIT, ready_wait: float = READY_WAIT) -> None:
        """`bind()`: where engines listen now; `state()`: the front door's /state (raises when it
        is away); `pushed()`: the last table it accepted; `changed()`: recompute the table;
        `enqueue(key)`: reconcile the key; `on_move(key, message)`: tell the user (an Event);
        `replacing(key)`: a deliberate stop of the key's engine is under way and no engine has
        taken its place yet (the drain's hold: a respawn's gap, not a service gone)."""
        self.bind = bind
        self.supervisors = supervisors
        self.state = state
        self.pushed = pushed
        self.changed = changed
        self.enqueue = enqueue
        self.on_move = on_move
        self.replacing = replacing
        self.poll = poll
        self.quiet_wait = quiet_wait
        self.ready_wait = ready_wait
        self.holding: set[str] = set()  # routes the table marks as starting: the front door holds them
        self.moved: list[str] = []  # keys moved, in order (status, tests)
        self._pending: dict[str, None] = {}  # insertion-ordered: first come, first moved
        self._cleared: set[str] = set()
        self._wake = asyncio.Event()

    def defers(self, key: str) -> bool:
        """Asked by the reconciler about an engine that listens off loopback: True while it must
        keep serving where it is (waiting its turn); False once it may be respawned."""
        if key in self._cleared:
            return False
        if key not in self._pending:
            self._pending[key] = None
            self._wake.set()
            log.info("engine listens on the Mac's address; it moves behind the front door in turn", service=key)
        return True

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                key = next(iter(self._pending))
                try:
                    await self._move(key)
                except Exception:  # noqa: BLE001 - one service's trouble must not stop the others' move
                    log.exception("moving an engine behind the front door failed", service=key)
                finally:
                    self._pending.pop(key, None)
                    self._cleared.discard(key)
                    if key in self.holding:
                        self.holding.discard(key)
                        self.changed()

    def _exposed(self, key: str) -> bool:
        sup = self.supervisors().get(key)
        return sup is not None and getattr(sup.plan, "host", None) != self.bind()

    async def _move(self, key: str) -> None:
        if not self._exposed(key):
            return  # stopped, or respawned for another reason meanwhile
        # First through the front door where it listens (never hold a route it has not served),
        # then a quiet moment.
        await self._until(lambda: self._routed(key), self.ready_wait)
        await self._until(lambda: self._idle(key, queued_too=True), self.quiet_wait)
        if not self.moved:
            pause_point(BEFORE_FIRST_MOVE)  # tests only (pause_point.py)
        self.holding.add(key)
        self.changed()
        if not await self._until(lambda: self._held(key), self.ready_wait):
            log.warning("the front door never took the hold; moving anyway", service=key)
        await self._until(lambda: self._idle(key, queued_too=False), self.ready_wait)
        if not self._exposed(key):
            return
        log.info("moving the engine onto 127.0.0.1 behind the front door", service=key)
        self.on_move(key, "moving the engine from the Mac's address onto 127.0.0.1 behind the front door "
                          "(requests are held meanwhile)")
        self._cleared.add(key)
        self.enqueue(key)
        await self._until(lambda: self._settled(key), self.ready_wait)
        self.moved.append(key)

    async def _until(self, check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await check():
                return True
            await asyncio.sleep(self.poll)
        return False

    async def _idle(self, key: str, *, queued_too: bool) -> bool:
        try:
            route = (await self.state()).get("routes", {}).get(key) or {}
        except Exception:  # noqa: BLE001 - the front door away (restarting): not known to be idle
            return False
        return not route.get("inflight") and not (queued_too and route.get("queued"))

    async def _routed(self, key: str) -> bool:
        table = self.pushed() or {}
        return any(r.get("key") == key and r.get("state") == "serving" for r in table.get("routes", ()))

    async def _held(self, key: str) -> bool:
        table = self.pushed() or {}
        return any(r.get("key") == key and r.get("state") != "serving" for r in table.get("routes", ()))

    async def _settled(self, key: str) -> bool:
        """Respawned on loopback and ready, or no longer running (stopped, deleted). A respawn
        stops the old engine before it starts the new one: in that gap there is no supervisor,
        and taking it for a stop for good moved the next service before this one served again."""
        sup = self.supervisors().get(key)
        if sup is None:
            return not self.replacing(key)
        snap = getattr(sup, "snapshot", None)
        return getattr(sup.plan, "host", None) == self.bind() and bool(snap is not None and snap.ready)
