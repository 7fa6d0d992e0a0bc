"""Background tasks: loops that cannot take the agent down, and cancellation that is not swallowed.

Two rules every long-lived task in the agent follows:

* **A background loop never ends the agent.** A heartbeat that meets a
  dropped connection, or housekeeping that meets a full disk, is a passing
  fault of the Mac, not a reason for launchd to restart everything (and, on
  the way, to stop supervising every llama-server). `supervised_loop` logs
  the failure, counts it, and starts the loop again after a jittered
  back-off, as a kubelet does with its sync loops.
* **Cancelling a child never cancels the cancellation of the parent.**
  `with suppress(CancelledError): await child` also swallows a cancel aimed
  at the *caller* while it waits, so a shutdown that lands mid-reconcile
  carries on reconciling and never ends. `cancel_and_wait` waits for the
  children to finish their clean-up (a spawn in flight must still be
  recorded and stopped) and then re-raises the caller's own cancellation.
  For the same reason a time limit is `within`, never `asyncio.wait_for`:
  Python 3.11's `wait_for` returns the result, and drops the cancellation,
  when what it waits for finishes as the cancellation lands.

Short-lived work a loop starts per key (the fleet's Lease writes per replica
slot) goes through `KeyedTasks`: one task per key, failures logged, and
cancelled with `cancel_and_wait` when the loop ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Coroutine, Generic, Hashable, TypeVar

import structlog
from prometheus_client import Counter

from metal_agent.core.backoff import Backoff

log = structlog.get_logger(__name__)

# Restart delays of a failed loop: quick for a one-off, a minute at most for
# a loop that keeps failing (the API server away, the disk full), and a clean
# slate after ten healthy minutes. Jittered so loops that failed together
# (one network change) do not all return at the same instant.
LOOP_BACKOFF = Backoff(initial=1.0, factor=2.0, cap=60.0, reset_after=600.0, jitter=0.5)


T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """`awaitable`'s result, or TimeoutError after `timeout` seconds; a cancellation always propagates."""
    async with asyncio.timeout(timeout):
        return await awaitable


async def cancel_and_wait(*tasks: asyncio.Future) -> None:
    """Cancel `tasks` and wait until every one has finished.

    If the caller is cancelled while it waits, the children are not
    cancelled a second time (that would interrupt their clean-up); the
    caller keeps waiting for them and then raises CancelledError, so its
    own cancellation is never lost. A child that ended with an exception
    rather than by cancellation is logged, never raised: the caller is
    tearing it down and has no use for it.
    """
    for task in tasks:
        task.cancel()
    caller_cancelled = False
    pending = {task for task in tasks if not task.done()}
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            caller_cancelled = True
        pending = {task for task in pending if not task.done()}
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            log.error("task failed before it was cancelled", task=name, exc_info=task.exception())
    if caller_cancelled:
        raise asyncio.CancelledError()


async def supervised_loop(
    name: str,
    factory: Callable[[], Awaitable[None]],
    failures: Counter,
    *,
    backoff: Backoff = LOOP_BACKOFF,
) -> None:
    """Run `factory()` and run it again whenever it raises, until it returns or is cancelled.

    `failures` is a Counter with one label (the loop's name); each failure
    is logged with its traceback and counted there. Cancellation is never
    caught: it is how the agent stops its loops. A loop that returns has
    finished its work and is not restarted.
    """
    consecutive = 0
    while True:
        started = time.monotonic()
        try:
            await factory()
            return
        except Exception as err:  # noqa: BLE001 - the whole point: nothing in a loop may end the agent
            consecutive = backoff.failures_after_run(consecutive, time.monotonic() - started)
            delay = backoff.delay(consecutive)
            failures.labels(name).inc()
            log.error("background loop failed; restarting it", loop=name, error=f"{type(err).__name__}: {err}",
                      attempt=consecutive, retry_in_s=round(delay, 2), exc_info=err)
        await asyncio.sleep(delay)


K = TypeVar("K", bound=Hashable)


class KeyedTasks(Generic[K]):
    """Fire-and-forget work, at most one task per key at a time.

    For writes a periodic loop decides on every round (the fleet's bids, hand-overs and
    releases, one per replica slot): a second start for a key still at work is dropped,
    because the round after it finishes decides again from fresh numbers. A failure is
    logged and forgotten for the same reason: the `expected` ones (the API away, a
    timeout) as a warning, anything else with its traceback, never an exception left
    unretrieved. `close` cancels what runs and waits for it (`cancel_and_wait`).
    """

    def __init__(self, name: str, *, expected: tuple[type[BaseException], ...] = ()) -> None:
        self.name = name
        self.expected = expected
        self._tasks: dict[K, asyncio.Task] = {}

    def start(self, key: K, coro: Coroutine[Any, Any, Any]) -> asyncio.Task | None:
        """Run `coro` for `key`; None (and `coro` closed, never awaited) while `key` is busy."""
        if self.busy(key):
            coro.close()
            return None
        task = asyncio.create_task(self._guarded(key, coro), name=f"{self.name} {key}")
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._tasks.pop(key, None) if self._tasks.get(key) is done else None)
        return task

    def busy(self, key: K) -> bool:
        return self.current(key) is not None

    def current(self, key: K) -> asyncio.Task | None:
        """The task at work for `key`, if any."""
        task = self._tasks.get(key)
        return task if task is not None and not task.done() else None

    def running(self) -> list[K]:
        return [key for key, task in self._tasks.items() if not task.done()]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks.values())
        self._tasks.clear()

    async def _guarded(self, key: K, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except self.expected as err:
            log.warning(f"{self.name} failed; the next round retries", key=str(key), error=f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - a bug: logged with its traceback, the loop goes on
            log.error(f"{self.name} failed unexpectedly", key=str(key), error=f"{type(err).__name__}: {err}",
                      exc_info=err)
