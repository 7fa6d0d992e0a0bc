"""Applies reconcile results to the work queue: the reconciler neither owns the queue nor
knows who feeds it."""

from __future__ import annotations

from metal_agent.controller.reconciler import Reconciler
from metal_agent.controller.results import Requeue
from metal_agent.controller.workqueue import WorkQueue
from metal_agent.metrics import AgentMetrics


class Runner:
    def __init__(self, queue: WorkQueue, reconciler: Reconciler, metrics: AgentMetrics) -> None:
        self.queue = queue
        self.reconciler = reconciler
        self.metrics = metrics

    async def handle(self, key: str) -> float | None:
        """The work queue's handler: reconcile `key`, counting outcomes for `reconciles_total`."""
        try:
            result = await self.reconciler.reconcile(key)
        except Exception:
            self.metrics.reconciles.labels("error").inc()
            raise
        if isinstance(result, Requeue):
            self.metrics.reconciles.labels("requeue").inc()
            return result.after
        self.metrics.reconciles.labels("ok").inc()
        return None

    def start(self) -> None:
        self.queue.start(self.handle)
