"""Watch the Mac's memory and act on `core.pressure` decisions.

Every `interval` seconds: read memory through the injected reader, advance
the pure `PressureState`, publish the gauges, and run the resulting actions
through callbacks the agent wires to the reconciler:

* `on_level_change(old, new)`  → MemoryPressure condition, Event MemoryPressureLevelChanged
* `evict(key)`                 → stop that service's llama-server, Event Evicted
* `on_eviction_skipped(reason)`→ Event EvictionSkipped
* `unblock(keys)`              → re-queue those services; they respawn on their own

The reconciler asks `is_blocked(key)` before (re)spawning a service, and
reports RespawnBlocked while it is. Callbacks may be plain functions or
coroutines; one that raises is logged and does not stop the watchdog (a
broken Event must not leave the Mac under pressure with nobody watching).

The default reader uses psutil (`available` = free + reclaimable pages) and,
on macOS, `vm_stat` for wired memory, which is where Metal buffers of loaded
models live and what Activity Monitor shows as "Wired".
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Awaitable, Callable, Sequence

import psutil
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from metal_agent.core.admission import memory_budget
from metal_agent.core.names import METRIC_PREFIX as P
from metal_agent.core.pressure import (
    Evict,
    EvictionSkipped,
    Level,
    LevelChanged,
    MemoryReading,
    PressureState,
    ServiceMemory,
    Thresholds,
    Unblock,
    parse_vm_stat,
    step,
)

log = structlog.get_logger(__name__)

Reader = Callable[[], Awaitable[MemoryReading]]
MaybeAwaitable = Awaitable[None] | None
VM_STAT = "/usr/bin/vm_stat"
DEFAULT_INTERVAL_S = 5.0


async def _vm_stat_wired(timeout: float = 5.0) -> int | None:
    proc = await asyncio.create_subprocess_exec(
        VM_STAT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    parsed = parse_vm_stat(out.decode("utf-8", errors="replace"))
    return parsed.wired_bytes if parsed else None


async def system_memory() -> MemoryReading:
    """The default reader: psutil's view, plus wired memory from vm_stat on macOS."""
    vm = psutil.virtual_memory()  # one host_statistics / sysinfo call; does not block
    wired = getattr(vm, "wired", None)
    if sys.platform == "darwin":
        try:
            wired = await _vm_stat_wired() or wired
        except OSError as err:
            log.debug("vm_stat failed; using psutil's wired figure", error=str(err))
    return MemoryReading(total_bytes=vm.total, available_bytes=vm.available, wired_bytes=wired)


class PressureMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.level = Gauge(P + "memory_pressure_level", "memory pressure: 0 normal, 1 warning, 2 critical", registry=registry)
        self.available = Gauge(P + "system_memory_available_bytes", "memory available to new allocations (free + reclaimable)", registry=registry)
        self.wired = Gauge(P + "system_memory_wired_bytes", "wired memory (macOS; 0 where unknown)", registry=registry)
        self.budget = Gauge(P + "memory_budget_bytes", "the agent's memory budget for all its services", registry=registry)
        self.evictions = Counter(P + "evictions", "services stopped to relieve memory pressure", registry=registry)
        self.skipped = Counter(P + "evictions_skipped", "evictions needed but not done, by reason", ["reason"], registry=registry)


async def _call(what: str, fn: Callable | None, *args) -> bool:
    """Run a callback (plain or async); False if it raised (logged, not propagated)."""
    if fn is None:
        return True
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
        return True
    except Exception:  # noqa: BLE001 - a callback bug must not stop the watchdog
        log.exception("memory watchdog callback failed", callback=what)
        return False


class MemoryWatchdog:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        services: Callable[[], Sequence[ServiceMemory]],
        evict: Callable[[str], MaybeAwaitable],
        unblock: Callable[[frozenset[str]], MaybeAwaitable],
        on_level_change: Callable[[Level, Level], MaybeAwaitable] | None = None,
        on_eviction_skipped: Callable[[str], MaybeAwaitable] | None = None,
        reader: Reader = system_memory,
        interval: float = DEFAULT_INTERVAL_S,
        thresholds: Thresholds = Thresholds(),
        memory_fraction: float | None = None,
        eviction_enabled: bool = True,
    ) -> None:
        """`services()` lists the services running now; `memory_fraction` is the
        agent's --memory-fraction (None: the RAM-dependent default), used for
        the memory_budget_bytes gauge."""
        self.metrics = PressureMetrics(registry)
        self.services = services
        self.evict = evict
        self.unblock = unblock
        self.on_level_change = on_level_change
        self.on_eviction_skipped = on_eviction_skipped
        self.reader = reader
        self.interval = interval
        self.thresholds = thresholds
        self.memory_fraction = memory_fraction
        self.eviction_enabled = eviction_enabled
        self.state = PressureState()
        self.last_reading: MemoryReading | None = None
        self._last_error: str | None = None

    @property
    def level(self) -> Level:
        return self.state.level

    def is_blocked(self, key: str) -> bool:
        """True while `key` was evicted and pressure has not returned to Normal."""
        return key in self.state.blocked

    def forget(self, key: str) -> None:
        """The service was deleted: drop its block."""
        self.state = self.state.forget(key)

    async def tick(self) -> None:
        """One reading, one decision, its actions. Reader failures are logged and skipped."""
        try:
            reading = await self.reader()
        except Exception as err:  # noqa: BLE001 - keep watching; report each distinct failure once
            message = f"{type(err).__name__}: {err}"
            if message != self._last_error:
                log.warning("cannot read system memory; skipping this check", error=message)
                self._last_error = message
            return
        self._last_error = None
        self.last_reading = reading
        self.metrics.available.set(reading.available_bytes)
        self.metrics.wired.set(reading.wired_bytes or 0)
        self.metrics.budget.set(memory_budget(None, reading.total_bytes, self.memory_fraction).bytes)

        self.state, actions = step(self.state, reading, self.services(), self.thresholds, evict=self.eviction_enabled)
        self.metrics.level.set(int(self.state.level))
        for action in actions:
            await self._execute(action, reading)

    async def _execute(self, action, reading: MemoryReading) -> None:
        share = f"{reading.available_bytes / reading.total_bytes:.0%}" if reading.total_bytes else "?"
        if isinstance(action, LevelChanged):
            log.warning("memory pressure level changed", old=action.old.label, new=action.new.label, available=share)
            await _call("on_level_change", self.on_level_change, action.old, action.new)
        elif isinstance(action, Evict):
            log.warning("evicting service to relieve memory pressure", service=action.key, available=share)
            if await _call("evict", self.evict, action.key):
                self.metrics.evictions.inc()
            else:
                # Not stopped: do not hold it as "being evicted" (that would block
                # every further eviction); the next critical tick chooses again.
                self.state = self.state.forget(action.key)
        elif isinstance(action, EvictionSkipped):
            log.info("memory is critical but nothing may be evicted", reason=action.reason, available=share)
            self.metrics.skipped.labels(action.reason).inc()
            await _call("on_eviction_skipped", self.on_eviction_skipped, action.reason)
        elif isinstance(action, Unblock):
            log.info("memory pressure is normal again; evicted services may respawn", services=sorted(action.keys))
            await _call("unblock", self.unblock, action.keys)

    async def run(self) -> None:
        """Tick every `interval` seconds until cancelled."""
        while True:
            await self.tick()
            await asyncio.sleep(self.interval)


def process_rss(pid: int) -> int:
    """Resident memory of a process (for `ServiceMemory.rss_bytes`); 0 if it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0
