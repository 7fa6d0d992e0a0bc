"""Events in, keys out: the one thing informers, supervisors and the download store call.

Level-triggered: every event (a spec or Model change, a process transition,
a resync) only queues the key of the service it concerns; the reconcile then
looks at the whole picture. Nothing here decides anything, and nothing here
waits: a callback from a watch or a supervisor returns at once.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import object_key
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.controller.workqueue import WorkQueue
from metal_agent.core.claim import wanted_draft, wanted_model
from metal_agent.core.model_validation import parse_model
from metal_agent.core.process import Snapshot, SupervisorEvent
from metal_agent.core.result import Invalid
from metal_agent.metrics import AgentMetrics, service_labels


class Intake:
    def __init__(self, queue: WorkQueue, *, isvcs: Mapping[str, dict], model_files: ModelFiles,
                 events: EventRecorder, metrics: AgentMetrics) -> None:
        """`isvcs`: the InferenceService cache (the informer's store, built before it)."""
        self.queue = queue
        self.isvcs = isvcs
        self.model_files = model_files
        self.events = events
        self.metrics = metrics

    def on_isvc_change(self, old: dict | None, new: dict | None) -> None:
        self.queue.add(object_key(new or old))

    def on_model_change(self, old: dict | None, new: dict | None) -> None:
        """A Model edit re-reconciles every InferenceService that refers to it."""
        model_key = object_key(new or old)
        if new is not None and old is not None:
            parsed = parse_model(new)
            if not isinstance(parsed, Invalid):
                self.model_files.retry(parsed.value)  # a fixed URL or sha256 must not wait out a remembered failure
        for isvc in list(self.isvcs.values()):
            if model_key in {f"{ref[0]}/{ref[1]}" for ref in (wanted_model(isvc), wanted_draft(isvc)) if ref}:
                self.queue.add(object_key(isvc))

    def on_process_change(self, key: str, snap: Snapshot, event: SupervisorEvent | None) -> None:
        labels = service_labels(key)
        self.metrics.process_healthy.labels(**labels).set(1 if snap.ready else 0)
        if event is not None:
            if event.reason == "Restarting":
                self.metrics.process_restarts.labels(**labels).inc()
            if event.reason == "Ready" and snap.started_at and not snap.adopted:
                self.metrics.startup_seconds.observe(max(0.0, (snap.ready_at or 0) - snap.started_at))
            raw = self.isvcs.get(key)
            if raw is not None:
                self.events.emit(raw["metadata"], event.reason, event.message, warning=event.warning)
        self.queue.add(key)

    def wake(self, keys: Iterable[str]) -> None:
        """Reconcile these keys again (memory was freed: those waiting may fit now)."""
        for key in keys:
            self.queue.add(key)

    def resync_all(self, running: Iterable[str]) -> None:
        """Both caches are full now: decide about every service and every process we run."""
        self.wake({object_key(raw) for raw in list(self.isvcs.values())} | set(running))
