"""Unified-memory bookkeeping for the reconciler: admission before a start, blocks after an eviction.

The reconciler asks one question before spawning ("may this service start
now?") and reports one thing after stopping ("it no longer holds memory").
This class keeps the numbers in between: the estimate of every service the
agent runs (the pure `core.admission` rule needs them all, which is what
LLMKube's check missed), the services waiting for memory (re-queued when
something stops), and whether the pressure watchdog has blocked a service.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import structlog
from prometheus_client import CollectorRegistry, Gauge

from metal_agent.adapters.memory_watchdog import read_system_memory
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.core.workload import Workload
from metal_agent.core.admission import INSUFFICIENT_MEMORY, Admit, Reject, admit
from metal_agent.core.companion_files import path_of
from metal_agent.core.memory import EstimateFailed, MemoryEstimate, gib
from metal_agent.core.names import METRIC_PREFIX as P
from metal_agent.core.status import Blocker
from metal_agent.core.wired_limit import WiredCeiling, check_wired
from metal_agent.memory.state import MemoryState
from metal_agent.metrics import service_labels

log = structlog.get_logger(__name__)

RESPAWN_BLOCKED = "RespawnBlocked"


@dataclass(frozen=True)
class Waiting:
    """A service that may not start yet; `blocker` goes into its status."""

    blocker: Blocker
    scheduling: tuple[str, str] | None  # (schedulingStatus, schedulingMessage), LLMKube's fields
    shortfall_bytes: int = 0  # what unloading others would have to free for it to fit (0: unknown)


def gpu_bytes(estimate: MemoryEstimate) -> int:
    """What a service wires for the GPU: weights, KV cache and compute buffers; llama-server's
    prompt cache (--cache-ram) lives in ordinary host memory."""
    return estimate.total_bytes - estimate.prompt_cache_bytes


class MemoryGuard:
    def __init__(
        self,
        model_files: ModelFiles,
        registry: CollectorRegistry,
        *,
        mode: Literal["enforce", "warn"] = "enforce",
        agent_fraction: float | None = None,
        is_blocked: Callable[[str], bool] = lambda key: False,
        total_ram: Callable[[], int] = lambda: read_system_memory().total_bytes,
        state: MemoryState | None = None,
        wired: Callable[[], WiredCeiling | None] = lambda: None,
    ) -> None:
        """`total_ram` defaults to the memory watchdog's own reading, so that admission and
        the watchdog judge the same machine by the same numbers. Who waits is kept in
        `state.waiting`, which the pressure responder reads."""
        self.model_files = model_files
        self.mode = mode
        self.agent_fraction = agent_fraction
        self.is_blocked = is_blocked
        self.total_ram = total_ram
        self.committed: dict[str, int] = {}
        self.wired = wired  # the GPU's wired-memory ceiling (None: unknown, not checked)
        self.gpu_committed: dict[str, int] = {}  # GPU-resident bytes of each running service
        self.waiting: set[str] = (state or MemoryState()).waiting
        self._reasons: dict[str, str] = {}  # why each waiting service waits
        self.estimated = Gauge(P + "memory_estimated_bytes", "estimated unified memory of a service (weights + KV cache + overhead)",
                               ["name", "namespace"], registry=registry)

    async def _estimate(self, workload: Workload, path: Path, draft: Path | None) -> MemoryEstimate | EstimateFailed:
        """The engine's estimate for the model at `path` (with the other files of its set), plus the
        weights and KV cache of the draft model at `draft`, or the KV cache of a draft that is a file of
        the set (`draftModel`: its weights are already counted); speculative decoding loads both into
        the one process."""
        engine = self.model_files.engine_of(workload.model)
        model = workload.model.spec
        estimate = await self.model_files.memory_estimate(path, workload.isvc.spec, engine, model)
        in_set = draft is None and bool(workload.isvc.spec.draft_model_file) and bool(model.files)
        if in_set:
            draft = Path(path_of(model, str(path), workload.isvc.spec.draft_model_file or ""))
        if draft is None or isinstance(estimate, EstimateFailed):
            return estimate
        extra = await self.model_files.memory_estimate(draft, workload.isvc.spec, engine)
        if isinstance(extra, EstimateFailed):
            return EstimateFailed(f"draft model: {extra.message}")
        weights = 0 if in_set else extra.weights_bytes
        return replace(estimate, weights_bytes=estimate.weights_bytes + weights,
                       kv_bytes=estimate.kv_bytes + extra.kv_bytes,
                       notes=(*estimate.notes, f"includes the draft model ({gib(weights + extra.kv_bytes)})"))

    async def check(self, key: str, workload: Workload, path: Path, draft: Path | None = None) -> Admit | Waiting:
        """May `key` start now with the model at `path` (and its draft model at `draft`)?"""
        if self.is_blocked(key):
            self.waiting.discard(key)
            return Waiting(Blocker(RESPAWN_BLOCKED, "evicted under memory pressure; it restarts on its own when "
                                   "memory pressure is Normal again", phase="Pending"), None)
        estimate = await self._estimate(workload, path, draft)
        verdict = admit(key, estimate, self.committed, hardware=workload.model.spec.hardware,
                        total_ram_bytes=self.total_ram(), agent_fraction=self.agent_fraction, mode=self.mode)
        if isinstance(verdict, Admit) and isinstance(estimate, MemoryEstimate):
            if why := check_wired(key, gpu_bytes(estimate), self.gpu_committed, self.wired()):
                verdict = Reject(INSUFFICIENT_MEMORY, why)
        if isinstance(verdict, Reject):
            self.waiting.add(key)
            waiting = Waiting(verdict.blocker(), (verdict.reason, verdict.message), verdict.shortfall_bytes)
            self._reasons[key] = waiting.blocker.message
            return waiting
        if verdict.warning:
            log.warning("memory check", service=key, warning=verdict.warning)
        self.waiting.discard(key)
        self.committed[key] = verdict.needed_bytes
        if isinstance(estimate, MemoryEstimate):
            self.gpu_committed[key] = gpu_bytes(estimate)
        self.estimated.labels(**service_labels(key)).set(verdict.needed_bytes)
        return verdict

    async def commit_running(self, key: str, workload: Workload, path: Path, draft: Path | None = None) -> None:
        """Count a process that already runs (taken over after an agent restart): it is never
        refused, but what it holds must count against what others may start."""
        try:
            estimate = await self._estimate(workload, path, draft)
        except OSError as err:  # an estimate we cannot make must not stop a running model
            estimate = EstimateFailed(str(err))
        if isinstance(estimate, EstimateFailed):
            log.warning("cannot estimate a running service's memory", service=key, error=estimate.message)
            return
        self.committed[key] = estimate.total_bytes
        self.gpu_committed[key] = gpu_bytes(estimate)
        self.estimated.labels(**service_labels(key)).set(estimate.total_bytes)

    def waiting_reason(self, key: str) -> str | None:
        """Why admission holds `key` back, while it does (the fleet hands such a replica on)."""
        return self._reasons.get(key) if key in self.waiting else None

    def counts(self, key: str) -> bool:
        """Whether `key`'s memory is counted against what others may start."""
        return key in self.committed

    def release(self, key: str) -> set[str]:
        """`key` stopped: forget its memory; return the services that may fit now."""
        freed = self.committed.pop(key, None)
        self.gpu_committed.pop(key, None)
        self.waiting.discard(key)
        self._reasons.pop(key, None)
        try:
            labels = service_labels(key)
            self.estimated.remove(labels["name"], labels["namespace"])
        except KeyError:
            pass
        return set(self.waiting) if freed else set()

    def forget(self, key: str) -> None:
        self.release(key)
