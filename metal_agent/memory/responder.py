"""The agent's answers to the memory watchdog: Events, evictions and re-queues.

The watchdog (adapters/memory_watchdog.py) decides; this acts on what it
decided without touching a process itself: an eviction marks the service
and queues its key, and the stop happens in that key's own reconcile, never
beside it. It reads the services the reconciler runs through the table the
reconciler writes (built before both), so the watchdog, this responder, the
guard and the reconciler form no cycle.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

from metal_agent.adapters.memory_watchdog import process_rss
from metal_agent.core.pressure import Level, ServiceMemory
from metal_agent.memory.state import MemoryState


class _Events(Protocol):
    def emit(self, obj_meta: dict, reason: str, message: str, *, warning: bool = False) -> None: ...


class _Processes(Protocol):
    def get(self, key: str): ...


class PressureResponder:
    def __init__(self, *, state: MemoryState, running: Mapping[str, object], isvcs: Mapping[str, dict],
                 processes: _Processes, events: _Events, enqueue: Callable[[str], None]) -> None:
        """`running`: the reconciler's table of the services it runs (key -> an entry with
        `.workload`); `isvcs`: the InferenceService cache; `enqueue`: the work queue's `add`."""
        self.state = state
        self.running = running
        self.isvcs = isvcs
        self.processes = processes
        self.events = events
        self.enqueue = enqueue
        self._last_skip: str | None = None

    def _emit(self, key: str, reason: str, message: str, *, warning: bool) -> None:
        raw = self.isvcs.get(key)
        if raw is not None:
            self.events.emit(raw["metadata"], reason, message, warning=warning)

    def on_pressure_change(self, old: Level, new: Level) -> None:
        self.state.level = new
        self._last_skip = None
        self.state.skip_message = ""
        for key in set(self.running) | self.state.waiting | self.state.evicted:
            self._emit(key, "MemoryPressureLevelChanged", f"memory pressure {old.label} -> {new.label}",
                       warning=new is not Level.NORMAL)
            self.enqueue(key)

    async def evict(self, key: str) -> None:
        self._emit(key, "Evicted", "stopped llama-server to relieve critical memory pressure", warning=True)
        self._explain_skip("")
        self.state.evicted.add(key)
        self.enqueue(key)  # the stop happens in the key's own reconcile, never beside it

    def unblock(self, keys: frozenset[str]) -> None:
        for key in keys:
            self.state.evicted.discard(key)
            self.enqueue(key)

    def eviction_skipped(self, reason: str, message: str = "") -> None:
        if reason == self._last_skip:
            return  # once per reason while the pressure lasts, not every tick
        self._last_skip = reason
        self._explain_skip(message)
        for key in list(self.running):
            self._emit(key, "EvictionSkipped", f"memory is critical but nothing was evicted: {message or reason}",
                       warning=True)

    def _explain_skip(self, message: str) -> None:
        """Say (or stop saying) in every MemoryPressure condition why nothing was evicted: the
        services' conditions are rewritten by their own reconciles, so each is re-queued."""
        if message != self.state.skip_message:
            self.state.skip_message = message
            for key in list(self.running):
                self.enqueue(key)

    def memory_view(self) -> list[ServiceMemory]:
        """The running services as the watchdog needs them."""
        rows = []
        for key, entry in self.running.items():
            supervisor = self.processes.get(key)
            snap = supervisor.snapshot if supervisor else None
            spec = entry.workload.isvc.spec
            rows.append(ServiceMemory(key=key, priority=spec.priority,
                                      rss_bytes=process_rss(snap.pid) if snap and snap.pid else 0,
                                      started_at=(snap.started_at or 0.0) if snap else 0.0,
                                      eviction_protection=spec.eviction_protection))
        return rows
