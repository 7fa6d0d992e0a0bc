"""A keyed work queue: level-triggered, de-duplicated, one worker per key.

Many events about one InferenceService (spec edit, Model edit, process exit,
resync) collapse into a single pending reconcile of its key. A key being
reconciled is never handed to a second worker; if it is queued again
meanwhile, it runs once more afterwards, so no change is lost. Keys are
independent: a slow reconcile of one never holds up another beyond the
concurrency bound.

Timers follow client-go's delaying queue: of two `add_after` calls for one
key the earlier deadline wins, so a "check again in 1 s" is never pushed
back by a "resync in 10 min". An `add` supersedes any timer (the reconcile
it causes states its own requeue). A failing key is retried after a
jittered exponential back-off (`core.backoff`), so many keys failing on
one API outage do not all retry in the same instant. Metrics, when given,
are client-go's `workqueue_*` set.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import structlog

from metal_agent.core.backoff import Backoff
from metal_agent.metrics import WorkQueueMetrics
from metal_agent.tasks import cancel_and_wait

log = structlog.get_logger(__name__)

Handler = Callable[[str], Awaitable[float | None]]  # returns "requeue after N seconds" or None


class WorkQueue:
    """Keys in, one handler call per key out. Built before anything that adds keys (informers,
    supervisors, the download store, the fleet); the handler is given at `start`, so the queue
    never depends on what consumes it."""

    def __init__(self, *, concurrency: int = 8, retry_initial: float = 0.5, retry_max: float = 60.0,
                 metrics: WorkQueueMetrics | None = None) -> None:
        self._handler: Handler | None = None
        self._concurrency = concurrency
        # Equal jitter: a retry waits between half and all of the doubled delay.
        self._retry = Backoff(initial=retry_initial, factor=2.0, cap=retry_max, jitter=0.5)
        self.metrics = metrics
        self._failures: dict[str, int] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()  # queued again while active
        self._added_at: dict[str, float] = {}  # when a waiting key was added: queue latency
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._workers: list[asyncio.Task] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, key: str) -> None:
        """Reconcile `key` soon (at most once more, however often it is added)."""
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        if key in self._active:
            if key not in self._dirty:
                self._dirty.add(key)
                self._counted_add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._counted_add(key)
            self._idle.clear()
            self._ready.put_nowait(key)

    def add_after(self, key: str, delay: float) -> None:
        """Reconcile `key` after `delay` seconds, unless something adds it sooner.

        An earlier pending timer for the key is kept; a later one is replaced.
        """
        if key in self._queued or key in self._dirty:
            return  # it runs soon anyway, and that reconcile states its own requeue
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending.when() <= when:
                return
            pending.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _counted_add(self, key: str) -> None:
        self._added_at.setdefault(key, time.monotonic())
        if self.metrics is not None:
            self.metrics.adds.inc()
            self.metrics.depth.set(len(self._queued) + len(self._dirty))

    def start(self, handler: Handler) -> None:
        self._handler = handler
        self._workers = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}") for i in range(self._concurrency)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        workers, self._workers = self._workers, []
        await cancel_and_wait(*workers)

    async def wait_idle(self) -> None:
        """Until nothing is queued or running (timers excepted); for shutdown and tests."""
        await self._idle.wait()

    async def _work(self) -> None:
        while True:
            key = await self._ready.get()
            self._queued.discard(key)
            self._active.add(key)
            started = time.monotonic()
            if self.metrics is not None:
                self.metrics.depth.set(len(self._queued) + len(self._dirty))
                self.metrics.queue_duration.observe(started - self._added_at.pop(key, started))
            else:
                self._added_at.pop(key, None)
            requeue: float | None = None
            try:
                requeue = await self._handler(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # an API error, or a bug: retry this key with back-off
                if self.metrics is not None:
                    self.metrics.retries.inc()
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                requeue = self._retry.delay(failures)
                log.warning("reconcile failed; retrying", service=key, error=f"{type(err).__name__}: {err}",
                            attempt=failures, retry_in_s=round(requeue, 3), exc_info=failures == 1)
            finally:
                self._active.discard(key)
                if self.metrics is not None:
                    self.metrics.work_duration.observe(time.monotonic() - started)
            if key in self._dirty:
                self._dirty.discard(key)
                self._queued.add(key)  # already counted as an add when it was marked dirty
                self._ready.put_nowait(key)
            elif requeue is not None:
                self.add_after(key, requeue)
            if not self._queued and not self._active:
                self._idle.set()
