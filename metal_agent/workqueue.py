"""A keyed work queue: level-triggered, de-duplicated, one worker per key.

Many events about one InferenceService (spec edit, Model edit, process exit,
resync) collapse into a single pending reconcile of its key. A key being
reconciled is never handed to a second worker; if it is queued again
meanwhile, it runs once more afterwards, so no change is lost. Keys are
independent: a slow reconcile of one never holds up another beyond the
concurrency bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

Handler = Callable[[str], Awaitable[float | None]]  # returns "requeue after N seconds" or None


class WorkQueue:
    def __init__(self, handler: Handler, *, concurrency: int = 8, retry_initial: float = 0.5, retry_max: float = 60.0) -> None:
        self._handler = handler
        self._concurrency = concurrency
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._failures: dict[str, int] = {}
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()  # queued again while active
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
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._idle.clear()
            self._ready.put_nowait(key)

    def add_after(self, key: str, delay: float) -> None:
        """Reconcile `key` after `delay` seconds, unless something adds it sooner."""
        if key in self._timers or key in self._queued:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}") for i in range(self._concurrency)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []

    async def wait_idle(self) -> None:
        """Until nothing is queued or running (timers excepted); for shutdown and tests."""
        await self._idle.wait()

    async def _work(self) -> None:
        while True:
            key = await self._ready.get()
            self._queued.discard(key)
            self._active.add(key)
            requeue: float | None = None
            try:
                requeue = await self._handler(key)
                self._failures.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # an API error, or a bug: retry this key with back-off
                failures = self._failures[key] = self._failures.get(key, 0) + 1
                requeue = min(self._retry_max, self._retry_initial * 2 ** (failures - 1))
                log.warning("reconcile failed; retrying", service=key, error=f"{type(err).__name__}: {err}",
                            attempt=failures, retry_in_s=requeue, exc_info=failures == 1)
            finally:
                self._active.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif requeue is not None:
                self.add_after(key, requeue)
            if not self._queued and not self._active:
                self._idle.set()
