"""Load on demand, unload when idle: who sleeps, who wakes, and when (issue 21, point 3).

The rules are the core's (core/on_demand.py); this module keeps the state and
acts on it, never stopping or starting a process itself: it marks a service
asleep (or awake) and queues its key, and the reconciler does the rest, as for
any change. The activity it needs (requests in flight, queued, the last one's
time per route) is the front door's: it asks `GET /state` only when a
service's idle time is up by its own clock or when memory is short, so an
idle Mac costs no polling. A request for a sleeping model reaches the agent
as `POST /wake` on its socket (adapters/agent_socket.py).

Without the front door nothing could hold a request while a model loads, so
the annotation is then refused with a condition and the service runs as an
ordinary always-loaded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Awaitable, Callable, Mapping

import structlog

from metal_agent.core.on_demand import (
    OnDemandError, OnDemandPolicy, Resident, choose_evictions, format_seconds, read_policy, seconds_until_idle,
)
from metal_agent.core.status import Blocker

log = structlog.get_logger(__name__)

INVALID = "InvalidOnDemandAnnotation"
NEEDS_FRONT_DOOR = "OnDemandNeedsFrontDoor"
RETRY_S = 5.0  # the front door did not answer: look again this much later (never unload on a guess)


def _nothing() -> None:
    return None


async def _no_activity() -> dict:
    return {}


async def _settled(key: str) -> bool:
    return True


class OnDemand:
    def __init__(self, *, enabled: bool, events, isvcs: Mapping[str, dict], running: Mapping[str, object],
                 enqueue: Callable[[str], None] = lambda key: None,
                 activity: Callable[[], Awaitable[dict]] = _no_activity,
                 changed: Callable[[], None] = _nothing, clock: Callable[[], float] = time.time,
                 settle: Callable[[str], Awaitable[bool]] = _settled) -> None:
        """`running`: the reconciler's table of services it runs; `activity()`: the front door's
        `GET /state`; `changed()`: the front door's table must be recomputed (a route sleeps or
        wakes); `settle(key)`: wait until the front door holds `key`'s requests (its route sleeps)."""
        self.enabled = enabled
        self.events = events
        self.isvcs = isvcs
        self.running = running
        self.enqueue = enqueue
        self.activity = activity
        self.changed = changed
        self.clock = clock
        self.settle = settle
        self.policies: dict[str, OnDemandPolicy] = {}
        self.asleep: dict[str, str] = {}  # key -> why it was unloaded (status says it)
        self.loading: dict[str, str] = {}  # key -> why it is being loaded, until it serves
        self.loaded_at: dict[str, float] = {}
        self.last_active: dict[str, float] = {}
        self._reported: dict[str, str] = {}
        self._wakeup = asyncio.Event()
        self._seen: set[str] = set()
        self._before: asyncio.Task | None = None  # the front door's route states when the agent started

    # -- what the reconciler asks --------------------------------------------------------------

    def read(self, key: str, raw: dict) -> Blocker | None:
        """Record `key`'s policy from its annotations; a problem to show in status, if any.
        A bad value leaves the service always loaded (and wakes it if it slept)."""
        meta = raw.get("metadata") or {}
        problem = None
        try:
            policy = read_policy(meta.get("annotations"))
        except OnDemandError as err:
            policy, problem = None, Blocker(INVALID, f"{err}; served as an always-loaded service")
        if policy is not None and not self.enabled:
            policy, problem = None, Blocker(NEEDS_FRONT_DOOR, "on-demand loading needs the front door "
                                            "(--front-door) to hold requests while a model loads; served as an "
                                            "always-loaded service")
        if problem is not None and self._reported.get(key) != problem.message:
            self._reported[key] = problem.message
            log.warning("on-demand annotation not honoured", service=key, why=problem.message)
            self.events.emit(meta, problem.reason, problem.message, warning=True)
        elif problem is None:
            self._reported.pop(key, None)
        if policy is None:
            if self.policies.pop(key, None) is not None or key in self.asleep:
                self._awake(key)
        elif self.policies.get(key) != policy:
            self.policies[key] = policy
            self._wakeup.set()
        return problem

    def is_asleep(self, key: str) -> bool:
        return key in self.asleep

    async def slept_before(self, key: str, *, running: bool) -> bool:
        """First sight of `key` since the agent started: it slept under the previous agent (its
        route sleeps at the front door and no engine runs) and sleeps on, rather than every
        on-demand model being loaded because the agent restarted."""
        if key in self._seen or key not in self.policies:
            return False
        self._seen.add(key)
        if running:
            return False
        if self._before is None:
            self._before = asyncio.get_running_loop().create_task(self._activity())
        seen = (await asyncio.shield(self._before) or {}).get(key)
        if not isinstance(seen, dict) or seen.get("state") != "sleeping":
            return False
        self.asleep[key] = "unloaded before the agent restarted; the next request loads it"
        self.changed()
        return True

    async def confirm_sleep(self, key: str) -> bool:
        """Before its engine is stopped: once the front door holds `key`'s new requests, is it
        still idle? A request that slipped in meanwhile keeps it loaded (False)."""
        if key not in self.asleep:
            return False
        await self.settle(key)
        activity = await self._activity()
        seen = activity.get(key) if activity is not None else None
        busy = isinstance(seen, dict) and bool(seen.get("inflight") or seen.get("queued"))
        if activity is not None and not busy:
            return True  # (a route the front door does not have yet has had no request)
        why = "a request arrived as it was being unloaded" if busy else "the front door did not answer"
        self.asleep.pop(key, None)
        self.loaded_at[key] = self.clock()  # its clock starts again
        self._emit(key, "UnloadCancelled", f"kept loaded: {why}")
        log.info("kept loaded", service=key, why=why)
        self.changed()
        self._wakeup.set()
        return False

    def started(self, key: str) -> None:
        """A process was spawned for `key`: its idle clock starts now."""
        self.loaded_at[key] = self.clock()
        self._wakeup.set()

    def notes(self, key: str, ready: bool) -> tuple[str | None, str | None]:
        """(why it sleeps, why it is loading) for its status; loading ends once it serves."""
        if ready and self.loading.pop(key, None) is not None:
            self.changed()
        return self.asleep.get(key), self.loading.get(key)

    def route_state(self, key: str) -> str | None:
        """What the front door should do for a route with no engine serving: hold and wake a
        sleeping one, hold a waking one (None: the usual rule)."""
        if key in self.asleep:
            return "sleeping"
        return "starting" if key in self.loading else None

    def label(self, key: str, state: str) -> str:
        """How `metal-agent status` shows a route's state."""
        if state == "sleeping":
            return "Idle"
        return "Loading on demand" if key in self.loading and state != "serving" else state

    def forget(self, key: str) -> None:
        for table in (self.policies, self.asleep, self.loading, self.loaded_at, self.last_active, self._reported):
            table.pop(key, None)
        self._seen.discard(key)

    # -- a request arrived ---------------------------------------------------------------------

    async def wake(self, key: str) -> str:
        """The front door holds a request for `key`: load it if it sleeps."""
        if key not in self.policies:
            return "not on demand"
        if key not in self.asleep:
            return "loading" if key in self.loading else "awake"
        self.asleep.pop(key)
        self.loading[key] = "a request arrived"
        self._emit(key, "LoadingOnDemand", "loading on demand: a request arrived")
        log.info("loading on demand: a request arrived", service=key)
        self.enqueue(key)
        self.changed()
        return "loading"

    def _awake(self, key: str) -> None:
        """No longer on demand (annotation removed or bad): a sleeping one is loaded again."""
        if self.asleep.pop(key, None) is not None:
            self.enqueue(key)
            self.changed()

    # -- memory is short -----------------------------------------------------------------------

    async def make_room(self, for_key: str, shortfall_bytes: int, committed: Mapping[str, int],
                        protected: Callable[[str], bool]) -> tuple[str, ...]:
        """Mark asleep the least recently used idle on-demand services whose memory lets
        `for_key` fit; the caller stops them. () when that cannot free enough."""
        keys = [k for k in committed if k in self.policies and k != for_key and k not in self.asleep]
        if not keys or shortfall_bytes <= 0:
            return ()
        activity = await self._activity()
        if activity is None:
            return ()  # who is busy is not known: unload nobody
        residents = []
        for k in keys:
            # A route the front door does not have yet has had no request: engines listen on
            # loopback, reached only through it.
            seen = activity.get(k) if isinstance(activity.get(k), dict) else {}
            busy = bool(seen.get("inflight") or seen.get("queued"))
            last = seen.get("last_active")
            residents.append(Resident(k, committed[k], True, protected(k), busy,
                                      last if isinstance(last, (int, float)) else self.loaded_at.get(k, 0.0)))
        chosen = choose_evictions(residents, shortfall_bytes, for_key=for_key)
        if not chosen:
            log.info("memory short; no idle on-demand model can make room", service=for_key,
                     short_bytes=shortfall_bytes, busy=[r.key for r in residents if r.busy],
                     protected=[r.key for r in residents if r.protected])
        for k in chosen:
            self._sleep(k, "UnloadedForMemory", f"evicted for {for_key} under memory shortage")
        return chosen

    # -- idle ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Sleep until the first loaded on-demand service's idle time is up by the agent's own
        clock, then check with the front door; never poll."""
        while True:
            self._wakeup.clear()
            delay = self._next_due()
            if delay is not None and delay <= 0:
                await self._unload_idle()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)

    def _loaded(self) -> list[str]:
        return [k for k in self.policies if k in self.running and k not in self.asleep]

    def _next_due(self) -> float | None:
        now = self.clock()
        due = []
        for key in self._loaded():
            loaded = self.loaded_at.setdefault(key, now)  # taken over after an agent restart: from now
            due.append(seconds_until_idle(self.policies[key], now=now, loaded_at=loaded,
                                          last_active=self.last_active.get(key), busy=False))
        return min(due) if due else None

    async def _unload_idle(self) -> None:
        activity = await self._activity() or {}
        now = self.clock()
        for key in self._loaded():
            seen = activity.get(key)
            if seen is None:  # the front door away or the route not there yet: look again later
                self.last_active[key] = now - self.policies[key].idle_after_s + RETRY_S
                continue
            last = seen.get("last_active")
            if isinstance(last, (int, float)):
                self.last_active[key] = max(self.last_active.get(key, 0.0), float(last))
            busy = bool(seen.get("inflight") or seen.get("queued"))
            left = seconds_until_idle(self.policies[key], now=now, loaded_at=self.loaded_at.get(key, now),
                                      last_active=self.last_active.get(key), busy=busy)
            if left is None:
                self.last_active[key] = now  # busy: its requests' end moves the clock on
            elif left <= 0:
                idle = format_seconds(self.policies[key].idle_after_s)
                self._sleep(key, "UnloadedIdle", f"idle for {idle}")

    def _sleep(self, key: str, reason: str, why: str) -> None:
        self.asleep[key] = f"unloaded: {why}; the next request loads it (held at the front door meanwhile)"
        self.loading.pop(key, None)
        self.loaded_at.pop(key, None)
        self.last_active.pop(key, None)
        self._emit(key, reason, f"unloaded: {why}")
        log.info("unloading an on-demand model", service=key, why=why)
        self.enqueue(key)
        self.changed()

    async def _activity(self) -> dict | None:
        """The front door's routes (in flight, queued, last activity, state); None when it did not answer."""
        try:
            routes = (await self.activity()).get("routes")
        except Exception as err:  # noqa: BLE001 - the front door away: nothing is known, nothing unloaded
            log.warning("cannot read the front door's activity; unloading nothing now", error=str(err))
            return None
        return routes if isinstance(routes, dict) else None

    def _emit(self, key: str, reason: str, message: str) -> None:
        raw = self.isvcs.get(key)
        if raw is not None:
            self.events.emit(raw["metadata"], reason, message)
