"""Per-route admission: a cap on requests in flight, a bounded FIFO queue, and holding.

One gate per route key lives as long as the route does, across tables, so a
request queued while the engine respawns is released by the table that gives
the route its new upstream. The arithmetic (go / wait / refuse) is the core's;
this module only keeps the counters and the waiters.
"""

from __future__ import annotations

import asyncio
import collections
import time

from metal_agent.core.front_door import Admission, Route, admit, retry_after_s

#: Back-off after an upstream connect failure on a serving route: the engine is probably
#: respawning, so hold requests a moment rather than fail them.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


class Refused(Exception):
    """No slot: the queue is full or the wait ran out. `holding` picks 503 over 429."""

    def __init__(self, status: int, retry_after: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after
        self.reason = reason


class Gate:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.inflight = 0
        self.last_request: float | None = None
        self.last_active: float | None = None  # a request's arrival or end: the idle clock's (wall time)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._suspended_until = 0.0
        self._backoff = BACKOFF_FIRST_S
        self._timer: asyncio.TimerHandle | None = None
        self.ejected = False  # passive health (outlier.py) took the engine out of rotation

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def holds(self) -> bool:
        return self.route.holds or self.ejected or time.monotonic() < self._suspended_until

    def update(self, route: Route) -> None:
        """A new table: new limits, maybe a new upstream; a fresh table ends any back-off, and
        a new engine (another upstream or state) ends an ejection of the old one."""
        if (route.upstream, route.state) != (self.route.upstream, self.route.state):
            self.ejected = False
        self.route = route
        self._suspended_until = 0.0
        self._backoff = BACKOFF_FIRST_S
        self._pump()

    def _refusal(self, reason: str) -> Refused:
        holds = self.holds
        after = retry_after_s(holds=holds, queued=self.queued, max_inflight=self.route.max_inflight,
                              queue_timeout_s=self.route.queue_timeout_s)
        return Refused(503 if holds else 429, after, reason)

    async def acquire(self, deadline: float) -> float:
        """Take a slot or wait for one until `deadline` (loop time); return the seconds waited."""
        self.last_request = self.last_active = time.time()
        route = self.route
        verdict = admit(holds=self.holds, inflight=self.inflight, queued=self.queued,
                        max_inflight=route.max_inflight, queue=route.queue)
        if verdict is Admission.GO:
            self.inflight += 1
            return 0.0
        if verdict is Admission.REFUSE:
            raise self._refusal("the queue is full")
        loop = asyncio.get_running_loop()
        start = loop.time()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, deadline - start))
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # granted as the clock ran out: the slot is not ours to keep
            raise self._refusal("timed out waiting for the model" if self.holds
                                else "timed out in the queue") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # granted in the same tick we were cancelled: hand it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
        return loop.time() - start

    def release(self) -> None:
        self.inflight -= 1
        self.last_active = time.time()
        self._pump()

    def upstream_failed(self) -> None:
        """A connect to a serving upstream failed: hold everyone for a short, growing back-off."""
        self._suspended_until = time.monotonic() + self._backoff
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._pump)

    def eject(self) -> None:
        """The engine failed a request: hold everyone until it proves healthy again."""
        self.ejected = True

    def reinstate(self) -> None:
        if self.ejected:
            self.ejected = False
            self._pump()

    def upstream_ok(self) -> None:
        self._backoff = BACKOFF_FIRST_S

    def _pump(self) -> None:
        """Hand free slots to the oldest waiters, in order."""
        if self.holds:
            return
        while self._waiters and self.inflight < self.route.max_inflight:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)

    def refuse_waiters(self, refusal: Refused) -> None:
        """The route left the table: its waiters get an answer now, not at their timeout."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(refusal)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
