"""The memory watchdog driven by a scripted reader: callbacks, blocking and gauges.

The services' resident memory is set so that, unless a test says otherwise,
they hold most of the memory in use: the pressure is theirs, so the
friendly-fire guard lets the eviction through.

The reader is the one seam (the issue asks for it): a list of readings
stands in for psutil/vm_stat, everything else (state machine, metrics on a
real registry, callback plumbing, the run loop) is the real code.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from metal_agent.adapters.memory_watchdog import MemoryWatchdog, system_memory
from metal_agent.core.api import Priority
from metal_agent.core.memory import GiB
from metal_agent.core.pressure import SKIP_FOREIGN_PRESSURE, SKIP_LAST_RUNNING, Level, MemoryReading, ServiceMemory
from tests.support.wait import wait_for

TOTAL = 32 * GiB


def at(pct: float, wired: int | None = 3 * GiB) -> MemoryReading:
    return MemoryReading(TOTAL, int(TOTAL * pct / 100), wired)


class Script:
    """Readings in order; an Exception in the list is raised instead of returned."""

    def __init__(self, *items) -> None:
        self.items = list(items)
        self.reads = 0

    async def __call__(self) -> MemoryReading:
        self.reads += 1
        item = self.items.pop(0) if len(self.items) > 1 else self.items[0]
        if isinstance(item, Exception):
            raise item
        return item


class Host:
    """What the agent would wire: running services, and records of each callback."""

    def __init__(self, *services: ServiceMemory) -> None:
        self.running = {s.key: s for s in services}
        self.log: list[tuple] = []
        self.messages: list[str] = []

    def services(self):
        return list(self.running.values())

    async def evict(self, key: str) -> None:
        await asyncio.sleep(0)  # an async stop, as the process manager's
        self.running.pop(key)
        self.log.append(("evict", key))

    def unblock(self, keys: frozenset[str]) -> None:
        self.log.append(("unblock", keys))

    def level_change(self, old: Level, new: Level) -> None:
        self.log.append(("level", old, new))

    def skipped(self, reason: str, message: str) -> None:
        self.log.append(("skipped", reason))
        self.messages.append(message)


def watchdog(host: Host, reader, registry: CollectorRegistry, **kw) -> MemoryWatchdog:
    return MemoryWatchdog(registry, services=host.services, evict=host.evict, unblock=host.unblock,
                          on_level_change=host.level_change, on_eviction_skipped=host.skipped,
                          reader=reader, **kw)


def sample(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(f"llmkube_metal_agent_{name}", labels)


async def test_pressure_evicts_blocks_and_releases_with_metrics():
    registry = CollectorRegistry()
    host = Host(ServiceMemory("ns/batch", Priority.BATCH, 8 * GiB, 1.0),
                ServiceMemory("ns/chat", Priority.HIGH, 10 * GiB, 2.0))
    dog = watchdog(host, Script(at(40), at(5), at(6), at(12), at(30)), registry)

    await dog.tick()  # Normal
    assert host.log == [] and sample(registry, "memory_pressure_level") == 0
    assert sample(registry, "system_memory_available_bytes") == int(TOTAL * 0.4)
    assert sample(registry, "system_memory_wired_bytes") == 3 * GiB
    assert sample(registry, "memory_budget_bytes") == int(TOTAL * 0.67)

    await dog.tick()  # Critical: the batch service goes
    assert host.log == [("level", Level.NORMAL, Level.CRITICAL), ("evict", "ns/batch")]
    assert dog.is_blocked("ns/batch") and not dog.is_blocked("ns/chat")
    assert sample(registry, "memory_pressure_level") == 2 and sample(registry, "evictions_total") == 1
    assert sample(registry, "memory_own_share_ratio") == pytest.approx(18 / (32 * 0.95))  # 18 GiB of 30.4 in use

    await dog.tick()  # still Critical, one service left: skipped, with a reason
    assert host.log[-1] == ("skipped", SKIP_LAST_RUNNING)
    assert sample(registry, "evictions_skipped_total", reason=SKIP_LAST_RUNNING) == 1

    await dog.tick()  # Warning: still blocked
    assert host.log[-1] == ("level", Level.CRITICAL, Level.WARNING) and dog.is_blocked("ns/batch")

    await dog.tick()  # Normal: released
    assert host.log[-2:] == [("level", Level.WARNING, Level.NORMAL), ("unblock", frozenset({"ns/batch"}))]
    assert not dog.is_blocked("ns/batch") and sample(registry, "memory_pressure_level") == 0


async def test_agent_memory_fraction_sets_the_budget_gauge():
    registry = CollectorRegistry()
    dog = watchdog(Host(), Script(at(50)), registry, memory_fraction=0.5)
    await dog.tick()
    assert sample(registry, "memory_budget_bytes") == TOTAL // 2


async def test_reader_and_callback_failures_do_not_stop_the_loop():
    registry = CollectorRegistry()
    host = Host(ServiceMemory("ns/a", Priority.LOW, 10 * GiB, 1.0), ServiceMemory("ns/b", Priority.LOW, 11 * GiB, 2.0))

    def broken_level_change(old, new):
        raise RuntimeError("event sink down")

    reader = Script(OSError("vm_stat vanished"), OSError("vm_stat vanished"), at(5))
    dog = MemoryWatchdog(registry, services=host.services, evict=host.evict, unblock=host.unblock,
                         on_level_change=broken_level_change, reader=reader, interval=0.01)
    task = asyncio.create_task(dog.run())
    try:
        await wait_for(lambda: ("evict", "ns/b") in host.log, timeout=10, what="an eviction after read errors")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert reader.reads >= 3 and dog.level is Level.CRITICAL
    assert sample(registry, "evictions_total") == 1


async def test_forget_releases_a_deleted_service():
    registry = CollectorRegistry()
    host = Host(ServiceMemory("ns/a", Priority.LOW, 10 * GiB, 1.0), ServiceMemory("ns/b", Priority.HIGH, 10 * GiB, 2.0))
    dog = watchdog(host, Script(at(5)), registry)
    await dog.tick()
    assert dog.is_blocked("ns/a")
    dog.forget("ns/a")
    assert not dog.is_blocked("ns/a")


async def test_default_reader_reads_this_machine():
    reading = await system_memory()
    assert reading.total_bytes > 0 and 0 <= reading.available_bytes <= reading.total_bytes
    if sys.platform == "darwin":
        assert reading.wired_bytes and reading.wired_bytes > 0


async def test_a_failed_eviction_is_not_counted_and_is_tried_again():
    registry = CollectorRegistry()
    host = Host(ServiceMemory("ns/a", Priority.LOW, 10 * GiB, 1.0), ServiceMemory("ns/b", Priority.HIGH, 10 * GiB, 2.0))
    attempts: list[str] = []

    async def flaky_evict(key: str) -> None:
        attempts.append(key)
        if len(attempts) == 1:
            raise RuntimeError("process manager busy")
        await host.evict(key)

    dog = MemoryWatchdog(registry, services=host.services, evict=flaky_evict, unblock=host.unblock,
                         reader=Script(at(5)))
    await dog.tick()
    assert attempts == ["ns/a"] and not dog.is_blocked("ns/a") and sample(registry, "evictions_total") == 0
    await dog.tick()
    assert attempts == ["ns/a", "ns/a"] and dog.is_blocked("ns/a") and sample(registry, "evictions_total") == 1


async def test_pressure_from_other_processes_is_not_relieved_with_our_models():
    """A browser or a build fills the Mac while our two services hold 6 GiB of the 30 GiB in
    use: nothing is stopped, the refusal says why (once as a warning), and the share is a gauge.
    When our services grow to most of the memory in use, the same pressure evicts."""
    registry = CollectorRegistry()
    batch = ServiceMemory("ns/batch", Priority.BATCH, 2 * GiB, 1.0)
    host = Host(batch, ServiceMemory("ns/chat", Priority.HIGH, 4 * GiB, 2.0))
    dog = watchdog(host, Script(at(6), at(5), at(5)), registry)

    with capture_logs() as logs:
        await dog.tick()
        await dog.tick()
    assert host.log == [("level", Level.NORMAL, Level.CRITICAL), ("skipped", SKIP_FOREIGN_PRESSURE),
                        ("skipped", SKIP_FOREIGN_PRESSURE)]
    assert not dog.is_blocked("ns/batch") and sample(registry, "evictions_total") == 0
    assert sample(registry, "evictions_skipped_total", reason=SKIP_FOREIGN_PRESSURE) == 2
    assert sample(registry, "memory_own_share_ratio") == pytest.approx(6 / (32 * 0.95))
    assert host.messages[0].startswith("pressure comes from other processes: this agent's services hold 6.0 GiB "
                                       "of the 30.1 GiB in use (20%)")
    refusals = [e for e in logs if e["event"].startswith("memory is critical but the pressure comes from other")]
    assert [e["log_level"] for e in refusals] == ["warning", "debug"]

    host.running["ns/batch"] = ServiceMemory("ns/batch", Priority.BATCH, 14 * GiB, 1.0)  # ours now: 18 of 30.4 GiB
    await dog.tick()
    assert host.log[-1] == ("evict", "ns/batch") and dog.is_blocked("ns/batch")


async def test_a_guard_of_zero_evicts_whatever_the_cause_and_a_bad_one_is_refused():
    registry = CollectorRegistry()
    host = Host(ServiceMemory("ns/a", Priority.LOW, 1, 1.0), ServiceMemory("ns/b", Priority.HIGH, 1, 2.0))
    dog = watchdog(host, Script(at(5)), registry, min_own_share=0.0)
    await dog.tick()
    assert host.log[-1] == ("evict", "ns/a")
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            watchdog(Host(), Script(at(5)), CollectorRegistry(), min_own_share=bad)
