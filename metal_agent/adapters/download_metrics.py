"""Byte gauges and a progress throttle for model downloads.

Why apart from `adapters.model_files`: the store decides what to fetch; how
progress is reported (per service, at most every few seconds) is its own job.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Gauge

from metal_agent.core.names import METRIC_PREFIX as P


class DownloadMetrics:
    """Per-service download progress, in bytes, labelled like LLMKube's per-service metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.done = Gauge(P + "model_download_bytes", "bytes of the service's model file downloaded so far",
                          ["name", "namespace"], registry=registry)
        self.total = Gauge(P + "model_download_total_bytes", "size of the service's model file being downloaded "
                           "(0 while unknown)", ["name", "namespace"], registry=registry)

    def set(self, key: str, done: int, total: int | None) -> None:
        namespace, name = key.split("/", 1)
        self.done.labels(name, namespace).set(done)
        self.total.labels(name, namespace).set(total or 0)

    def forget(self, key: str) -> None:
        namespace, name = key.split("/", 1)
        for gauge in (self.done, self.total):
            try:
                gauge.remove(name, namespace)
            except KeyError:
                pass


class Throttle:
    """Call `fire` at most once per `interval`; a call inside the window is deferred
    to its end (never dropped), so the last state is always reported."""

    def __init__(self, interval: float, fire: Callable[[], None]) -> None:
        self.interval = interval
        self.fire = fire
        self.last = float("-inf")
        self.pending: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self.pending is not None:
            return
        wait = self.last + self.interval - time.monotonic()
        if wait <= 0:
            self._run()
        else:
            self.pending = asyncio.get_running_loop().call_later(wait, self._run)

    def _run(self) -> None:
        self.pending = None
        self.last = time.monotonic()
        self.fire()

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
