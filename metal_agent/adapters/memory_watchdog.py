"""Watch the Mac's memory and act on `core.pressure` decisions.

Every `interval` seconds: read memory through the injected reader, advance
the pure `PressureState`, publish the gauges, and run the resulting actions
through callbacks the agent wires to the reconciler:

* `on_level_change(old, new)`  → MemoryPressure condition, Event MemoryPressureLevelChanged
* `evict(key)`                 → stop that service's llama-server, Event Evicted
* `on_eviction_skipped(reason, message)` → Event EvictionSkipped; `message` (may be
                                 empty) is for people: for `PressureFromOtherProcesses` it says the
                                 pressure comes from other processes, with the numbers, for the
                                 MemoryPressure condition message too
* `unblock(keys)`              → re-queue those services; they respawn on their own

The reconciler asks `is_blocked(key)` before (re)spawning a service, and
reports RespawnBlocked while it is. Callbacks may be plain functions or
coroutines; one that raises is logged and does not stop the watchdog (a
broken Event must not leave the Mac under pressure with nobody watching).

The default reader, `system_memory`, is also where admission gets the RAM
size (`read_system_memory`), so both act on the same numbers. On macOS it is
one `host_statistics64` call and one `sysctlbyname` through ctypes
(`adapters.darwin_memory`): available = free + inactive + purgeable pages,
wired memory (where the Metal buffers of loaded models live, Activity
Monitor's "Wired"), and the kernel's own pressure level, which decides the
level there. Elsewhere psutil's `available` (MemAvailable on Linux).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import psutil
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from metal_agent.core.admission import memory_budget
from metal_agent.core.names import METRIC_PREFIX as P
from metal_agent.core.pressure import (
    DEFAULT_MIN_OWN_SHARE,
    SKIP_FOREIGN_PRESSURE,
    Attribution,
    Evict,
    EvictionSkipped,
    Level,
    LevelChanged,
    MemoryReading,
    PressureState,
    ServiceMemory,
    Thresholds,
    Unblock,
    attribute,
    step,
    validate_min_own_share,
)

log = structlog.get_logger(__name__)

Reader = Callable[[], Awaitable[MemoryReading]]
MaybeAwaitable = Awaitable[None] | None
DEFAULT_INTERVAL_S = 5.0


@functools.cache
def _darwin_memory():  # noqa: ANN202 - imported lazily: ctypes bindings for libSystem exist only on macOS
    from metal_agent.adapters.darwin_memory import DarwinMemory

    return DarwinMemory()


_darwin_failure: list[str] = []  # the last distinct failure of the libSystem path, logged once


def _psutil_reading() -> MemoryReading:
    vm = psutil.virtual_memory()  # one sysinfo call and /proc/meminfo (host_statistics64 on macOS)
    return MemoryReading(total_bytes=vm.total, available_bytes=vm.available, wired_bytes=getattr(vm, "wired", None))


def read_system_memory() -> MemoryReading:
    """This machine's memory now; the one source for the watchdog and for admission.

    Non-blocking system calls only (no subprocess), so it may run on the event loop.
    On macOS, should the libSystem calls fail (they cannot be run anywhere but on a
    Mac), the reading falls back to psutil's, logged as an error once: a watchdog
    judging by a cruder share beats one that cannot judge at all.
    """
    if sys.platform == "darwin":
        try:
            reading = _darwin_memory().read()
        except (OSError, AttributeError, ctypes.ArgumentError) as err:
            message = f"{type(err).__name__}: {err}"
            if message not in _darwin_failure:
                _darwin_failure[:] = [message]
                log.error("cannot read memory through libSystem; using psutil's figures", error=message)
        else:
            _darwin_failure.clear()
            return reading
    return _psutil_reading()


async def system_memory() -> MemoryReading:
    """The default reader: :func:`read_system_memory`."""
    return read_system_memory()


def file_reader(path: Path) -> Reader:
    """Readings from a JSON file, re-read at every check, for pressure drills and tests.

    Memory cannot be pushed to critical on cue on a shared machine, and the
    kernel's own level exists only on a Mac; this lets a drill (or the fault
    tests) walk the real agent through Warning, Critical and back. The file
    holds `{"total_bytes": N, "available_bytes": N, "kernel_level": "critical"}`
    (the level optional). A file that cannot be read fails the check, which is
    logged and retried like any failed reading.
    """
    async def read() -> MemoryReading:
        data = json.loads(await asyncio.to_thread(path.read_text))
        level = data.get("kernel_level")
        return MemoryReading(total_bytes=int(data["total_bytes"]), available_bytes=int(data["available_bytes"]),
                             kernel_level=Level[level.upper()] if level else None)
    return read


class PressureMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.level = Gauge(P + "memory_pressure_level", "memory pressure: 0 normal, 1 warning, 2 critical", registry=registry)
        self.available = Gauge(P + "system_memory_available_bytes", "memory available to new allocations (macOS: free + inactive + purgeable pages; Linux: MemAvailable)", registry=registry)
        self.wired = Gauge(P + "system_memory_wired_bytes", "wired memory (macOS; 0 where unknown)", registry=registry)
        self.budget = Gauge(P + "memory_budget_bytes", "the agent's memory budget for all its services", registry=registry)
        self.evictions = Counter(P + "evictions", "services stopped to relieve memory pressure", registry=registry)
        self.skipped = Counter(P + "evictions_skipped", "evictions needed but not done, by reason", ["reason"], registry=registry)
        self.own_share = Gauge(P + "memory_own_share_ratio",
                               "share of the memory in use (total - available) held by this agent's services "
                               "(their resident memory), 0..1; at Critical an eviction needs more than the "
                               "configured minimum (default 0.5)", registry=registry)


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
        min_own_share: float = DEFAULT_MIN_OWN_SHARE,
    ) -> None:
        """`services()` lists the services running now; `memory_fraction` is the
        agent's --memory-fraction (None: the RAM-dependent default), used for
        the memory_budget_bytes gauge. `min_own_share` is the friendly-fire
        guard: at Critical, evict only when our services hold more than this
        share of the memory in use (0: whatever the cause)."""
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
        self.min_own_share = validate_min_own_share(min_own_share)
        self.state = PressureState()
        self.last_reading: MemoryReading | None = None
        self._last_error: str | None = None
        self._foreign_said = False  # the refusal is logged as a warning once per pressure episode

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

        services = self.services()
        attribution = attribute(reading, services)
        self.metrics.own_share.set(attribution.share)
        self.state, actions = step(self.state, reading, services, self.thresholds, evict=self.eviction_enabled,
                                   min_own_share=self.min_own_share)
        self.metrics.level.set(int(self.state.level))
        for action in actions:
            await self._execute(action, reading, attribution)

    async def _execute(self, action, reading: MemoryReading, attribution: Attribution) -> None:
        share = f"{reading.available_bytes / reading.total_bytes:.0%}" if reading.total_bytes else "?"
        if isinstance(action, LevelChanged):
            self._foreign_said = False
            log.warning("memory pressure level changed", old=action.old.label, new=action.new.label, available=share,
                        judged_by="kernel" if reading.kernel_level is not None else "available share")
            await _call("on_level_change", self.on_level_change, action.old, action.new)
        elif isinstance(action, Evict):
            self._foreign_said = False
            log.warning("evicting service to relieve memory pressure", service=action.key, available=share,
                        own_share=round(attribution.share, 3))
            if await _call("evict", self.evict, action.key):
                self.metrics.evictions.inc()
            else:
                # Not stopped: do not hold it as "being evicted" (that would block
                # every further eviction); the next critical tick chooses again.
                self.state = self.state.forget(action.key)
        elif isinstance(action, EvictionSkipped):
            if action.reason == SKIP_FOREIGN_PRESSURE:
                say = log.debug if self._foreign_said else log.warning
                self._foreign_said = True
                say("memory is critical but the pressure comes from other processes; not evicting",
                    detail=action.message, min_own_share=self.min_own_share, available=share)
            else:
                log.info("memory is critical but nothing may be evicted", reason=action.reason, available=share)
            self.metrics.skipped.labels(action.reason).inc()
            await _call("on_eviction_skipped", self.on_eviction_skipped, action.reason, action.message)
        elif isinstance(action, Unblock):
            log.info("memory pressure is normal again; evicted services may respawn", services=sorted(action.keys))
            await _call("unblock", self.unblock, action.keys)

    async def run(self) -> None:
        """Tick every `interval` seconds until cancelled, on the loop clock's grid of `interval`:
        with the default 5 s it wakes in the same loop iteration as the supervisors' probes
        (supervisor.py), so an idle agent wakes once per 5 s for both, not twice."""
        loop = asyncio.get_running_loop()
        while True:
            await self.tick()
            await asyncio.sleep(self.interval - loop.time() % self.interval)


def process_rss(pid: int) -> int:
    """Resident memory of a process (for `ServiceMemory.rss_bytes`); 0 if it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0
