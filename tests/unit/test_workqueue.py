"""Work queue: earliest-wins timers, jittered retries, client-go's metrics, shutdown mid-reconcile."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from metal_agent.metrics import AgentMetrics, WorkQueueMetrics
from metal_agent.tasks import cancel_and_wait
from metal_agent.controller.workqueue import WorkQueue
from tests.support.slowness import scaled
from tests.support.wait import wait_for


def recording_queue(**kwargs) -> tuple[WorkQueue, list[tuple[str, float]], object]:
    calls: list[tuple[str, float]] = []

    async def handler(key: str):
        calls.append((key, asyncio.get_running_loop().time()))
        return None

    return WorkQueue(concurrency=2, **kwargs), calls, handler


def sample(registry: CollectorRegistry, name: str, suffix: str = "") -> float:
    value = registry.get_sample_value(name + suffix, {"name": "inferenceservices"})
    return 0.0 if value is None else value


async def test_add_after_keeps_the_earlier_timer():
    queue, calls, handler = recording_queue()
    queue.start(handler)
    try:
        queue.add_after("k", 0.05)
        queue.add_after("k", 3600)  # a resync must not push back a "look again soon"
        await wait_for(lambda: calls, timeout=5, what="the earlier timer to fire")
        assert [key for key, _ in calls] == ["k"]
    finally:
        await queue.stop()


async def test_add_after_replaces_a_later_timer_with_an_earlier_one():
    queue, calls, handler = recording_queue()
    queue.start(handler)
    try:
        queue.add_after("k", 3600)
        queue.add_after("k", 0.05)
        await wait_for(lambda: calls, timeout=5, what="the earlier timer to fire")
        await queue.wait_idle()
        assert len(calls) == 1
        assert not queue._timers, "the replaced timer must be gone, not fire later"
    finally:
        await queue.stop()


async def test_add_supersedes_a_pending_timer():
    queue, calls, handler = recording_queue()
    queue.start(handler)
    try:
        queue.add_after("k", 3600)
        queue.add("k")
        await wait_for(lambda: calls, timeout=5, what="the immediate reconcile")
        assert not queue._timers
    finally:
        await queue.stop()


async def test_failing_key_is_retried_with_jittered_doubling_delays():
    """Retry gaps stay within [d/2, d] of the doubled delay (plus scheduling slack)."""
    loop = asyncio.get_running_loop()
    attempts: list[float] = []

    async def handler(key: str):
        attempts.append(loop.time())
        if len(attempts) <= 4:
            raise RuntimeError("API away")
        return None

    registry = CollectorRegistry()
    queue = WorkQueue(concurrency=1, retry_initial=0.1, retry_max=0.4,
                      metrics=WorkQueueMetrics(registry, "inferenceservices"))
    queue.start(handler)
    try:
        queue.add("k")
        await wait_for(lambda: len(attempts) == 5, timeout=10, what="five attempts")
    finally:
        await queue.stop()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    for gap, ceiling in zip(gaps, [0.1, 0.2, 0.4, 0.4]):
        assert ceiling / 2 - 0.01 <= gap <= ceiling + scaled(0.25), (gaps, ceiling)
    assert sample(registry, "workqueue_retries", "_total") == 4


async def test_metrics_count_adds_depth_and_durations_like_client_go():
    registry = CollectorRegistry()
    gate = asyncio.Event()
    handled: list[str] = []

    async def handler(key: str):
        if key == "slow":
            await gate.wait()
        handled.append(key)
        return None

    queue = WorkQueue(concurrency=1, metrics=AgentMetrics(registry).workqueue)
    try:
        for _ in range(3):
            queue.add("a")  # de-duplicated: one add
        queue.add("slow")
        assert sample(registry, "workqueue_adds", "_total") == 2
        assert sample(registry, "workqueue_depth") == 2
        queue.start(handler)
        await wait_for(lambda: handled == ["a"], timeout=5, what="a reconciled")
        await wait_for(lambda: sample(registry, "workqueue_depth") == 0, timeout=5, what="depth 0 while slow runs")
        queue.add("slow")  # while it runs: queued again once, counted once
        queue.add("slow")
        assert sample(registry, "workqueue_adds", "_total") == 3
        assert sample(registry, "workqueue_depth") == 1
        gate.set()
        await asyncio.wait_for(queue.wait_idle(), 5)
        assert handled == ["a", "slow", "slow"]
        assert sample(registry, "workqueue_depth") == 0
        assert sample(registry, "workqueue_queue_duration_seconds", "_count") == 3
        assert sample(registry, "workqueue_work_duration_seconds", "_count") == 3
        assert sample(registry, "workqueue_retries", "_total") == 0
    finally:
        await queue.stop()


async def test_stop_mid_reconcile_ends_even_when_the_reconcile_is_stopping_a_child():
    """The shutdown hang: a worker stopping a supervisor task when the stop lands must end."""
    in_cleanup = asyncio.Event()
    release = asyncio.Event()
    after: list[str] = []

    async def supervise() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            in_cleanup.set()
            await release.wait()  # terminating llama-server
            raise

    async def handler(key: str):
        child = asyncio.create_task(supervise())
        await asyncio.sleep(0)
        await cancel_and_wait(child)  # as Supervisor.stop() does
        after.append(key)  # a swallowed cancel would carry on here and never end the worker
        return None

    queue = WorkQueue(concurrency=1)
    queue.start(handler)
    queue.add("k")
    await asyncio.wait_for(in_cleanup.wait(), 5)
    stopping = asyncio.create_task(queue.stop())
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert after == []


async def test_stop_does_not_swallow_the_callers_cancellation():
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(key: str):
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()

    queue = WorkQueue(concurrency=1)
    queue.start(handler)
    queue.add("k")
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(queue.stop())
    await asyncio.sleep(0)
    stopping.cancel()
    release.set()
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done and stopping.cancelled()
