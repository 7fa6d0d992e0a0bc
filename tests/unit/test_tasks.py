"""Background loops that survive their failures, and cancellation that is never swallowed."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter

from metal_agent.core.backoff import Backoff
from metal_agent.tasks import KeyedTasks, cancel_and_wait, supervised_loop, within
from tests.support.wait import wait_for

QUICK = Backoff(initial=0.01, factor=1.0, cap=0.01, reset_after=60)


def failures_counter() -> Counter:
    return Counter("loop_failures", "test", ["loop"], registry=CollectorRegistry())


async def test_a_loop_that_raises_is_restarted_and_each_failure_counted():
    failures = failures_counter()
    calls = 0
    running = asyncio.Event()

    async def loop() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise OSError(28, "No space left on device")
        running.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervised_loop("housekeeping", loop, failures, backoff=QUICK))
    try:
        await asyncio.wait_for(running.wait(), 5)
        assert calls == 4
        assert failures.labels("housekeeping")._value.get() == 3
        assert not task.done()
    finally:
        await cancel_and_wait(task)


async def test_any_exception_is_survived_not_only_os_errors():
    failures = failures_counter()
    seen: list[str] = []

    async def loop() -> None:
        seen.append("run")
        if len(seen) == 1:
            raise KeyError("a bug")
        await asyncio.Event().wait()

    task = asyncio.create_task(supervised_loop("heartbeats", loop, failures, backoff=QUICK))
    try:
        await wait_for(lambda: len(seen) == 2, timeout=5, what="the restart")
        assert failures.labels("heartbeats")._value.get() == 1
    finally:
        await cancel_and_wait(task)


async def test_restarts_back_off_between_failures():
    """A loop failing at once must not spin: the n-th restart waits the n-th back-off delay."""
    loop_time = asyncio.get_running_loop().time
    starts: list[float] = []

    async def loop() -> None:
        starts.append(loop_time())
        raise RuntimeError("always")

    backoff = Backoff(initial=0.05, factor=2.0, cap=1.0, reset_after=60)
    task = asyncio.create_task(supervised_loop("x", loop, failures_counter(), backoff=backoff))
    try:
        await wait_for(lambda: len(starts) >= 4, timeout=5, what="four starts")
    finally:
        await cancel_and_wait(task)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2, gaps


async def test_cancelling_a_supervised_loop_ends_it_cancelled():
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervised_loop("x", loop, failures_counter(), backoff=QUICK))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()


async def test_cancelling_during_the_back_off_ends_it_cancelled_too():
    failed = asyncio.Event()

    async def loop() -> None:
        failed.set()
        raise RuntimeError("boom")

    slow = Backoff(initial=3600, cap=3600)
    task = asyncio.create_task(supervised_loop("x", loop, failures_counter(), backoff=slow))
    await asyncio.wait_for(failed.wait(), 5)
    await asyncio.sleep(0)  # let it reach the back-off sleep
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done and task.cancelled()


async def test_a_loop_that_returns_is_finished_not_restarted():
    calls = 0

    async def loop() -> None:
        nonlocal calls
        calls += 1

    await asyncio.wait_for(supervised_loop("x", loop, failures_counter(), backoff=QUICK), 5)
    assert calls == 1


# -- cancel_and_wait -----------------------------------------------------------------


def child_with_cleanup(gate: asyncio.Event, log: list[str]) -> asyncio.Task:
    """A task whose clean-up after a cancel takes until `gate` is set (a process being stopped)."""

    async def child() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("cancelled")
            try:
                await gate.wait()
            except asyncio.CancelledError:
                log.append("clean-up interrupted")
                raise
            log.append("cleaned up")
            raise

    return asyncio.create_task(child())


async def test_cancelling_the_caller_while_it_waits_for_a_child_is_not_swallowed():
    """The shutdown hang: a worker cancelled while it stops a child must end, not carry on."""
    gate = asyncio.Event()
    log: list[str] = []
    reached_after: list[bool] = []
    child = child_with_cleanup(gate, log)
    await asyncio.sleep(0)
    waiting = asyncio.Event()

    async def outer() -> None:
        waiting.set()
        await cancel_and_wait(child)
        reached_after.append(True)  # the old `suppress(CancelledError)` carried on to here

    task = asyncio.create_task(outer())
    await asyncio.wait_for(waiting.wait(), 5)
    await wait_for(lambda: log == ["cancelled"], timeout=5, what="the child to start its clean-up")
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done(), "the caller must still wait for the child's clean-up"
    gate.set()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the caller did not end after the child finished"
    assert task.cancelled()
    assert reached_after == []
    assert log == ["cancelled", "cleaned up"], "the child's clean-up was interrupted by a second cancel"
    assert child.cancelled()


async def test_cancel_and_wait_returns_normally_when_only_the_children_are_cancelled():
    gate = asyncio.Event()
    gate.set()
    log: list[str] = []
    children = [child_with_cleanup(gate, log) for _ in range(3)]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(*children), 5)
    assert all(c.cancelled() for c in children)
    assert log.count("cleaned up") == 3


async def test_a_child_that_failed_earlier_is_reported_not_raised():
    async def broken() -> None:
        raise RuntimeError("died")

    child = asyncio.create_task(broken())
    await asyncio.wait({child})
    await cancel_and_wait(child)  # must not raise RuntimeError into the caller


@pytest.mark.parametrize("n", [0, 1])
async def test_nothing_to_cancel_is_fine(n):
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    await asyncio.wait_for(cancel_and_wait(*[done] * n), 1)


async def _cancel_as_it_finishes(limit) -> asyncio.Task:
    """A loop that waits under `limit`, cancelled in the very iteration its wait finishes
    (a powermetrics run exiting as the agent stops): the moment 3.11's wait_for loses it."""
    finished = asyncio.get_running_loop().create_future()

    async def loop() -> None:
        while True:
            await limit(finished, 5)
            await asyncio.sleep(0.01)  # the next run; a lost cancellation keeps it going

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop now waits on `finished`
    finished.set_result(None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # ended: the cancellation reached the loop
        async with asyncio.timeout(2):
            await task
    return task


async def test_within_never_loses_a_cancellation_that_lands_as_its_wait_finishes():
    assert (await _cancel_as_it_finishes(within)).cancelled()


async def test_within_still_times_out_and_returns_results():
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(10), 0.01)
    assert await within(asyncio.sleep(0, result="done"), 1) == "done"


# -- KeyedTasks: at most one task per key --------------------------------------------


async def test_a_key_at_work_takes_no_second_task_and_the_dropped_coroutine_is_closed():
    tasks: KeyedTasks[str] = KeyedTasks("write")
    release = asyncio.Event()
    ran: list[str] = []

    async def work(tag: str) -> None:
        ran.append(tag)
        await release.wait()

    first = tasks.start("slot", work("first"))
    second_coro = work("second")
    assert tasks.start("slot", second_coro) is None
    assert second_coro.cr_frame is None  # closed, so never "coroutine was never awaited"
    other = tasks.start("other", work("other"))
    assert first is not None and other is not None and tasks.busy("slot") and tasks.current("slot") is first
    release.set()
    await asyncio.gather(first, other)
    assert ran == ["first", "other"] and not tasks.busy("slot") and tasks.running() == []
    again = tasks.start("slot", work("again"))  # the key is free once its task is done
    await again
    assert ran[-1] == "again"


@pytest.mark.parametrize("error, level", [(OSError("refused"), "warning"), (KeyError("bug"), "error")])
async def test_a_failed_task_is_logged_never_raised_and_frees_its_key(error, level):
    from structlog.testing import capture_logs

    tasks: KeyedTasks[str] = KeyedTasks("lease write", expected=(OSError,))

    async def fail() -> None:
        raise error

    with capture_logs() as logs:
        await tasks.start("slot", fail())
    [entry] = [e for e in logs if e["event"].startswith("lease write failed")]
    assert entry["log_level"] == level and entry["key"] == "slot" and type(error).__name__ in entry["error"]
    assert not tasks.busy("slot")


async def test_close_cancels_what_runs_and_waits_for_its_cleanup():
    tasks: KeyedTasks[int] = KeyedTasks("write")
    cleaned: list[int] = []
    started = asyncio.Event()

    async def work(n: int) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            cleaned.append(n)

    running = [tasks.start(n, work(n)) for n in range(3)]
    await started.wait()
    await tasks.close()
    assert sorted(cleaned) == [0, 1, 2] and all(t.cancelled() for t in running) and tasks.running() == []
