"""The agent's Prometheus metrics, with the names LLMKube's dashboards use.

One object owns them on a caller-given registry, so the daemon, tests and
benchmarks each get a clean set. Power gauges live with the power sampler
(`adapters.powermetrics`); everything about processes and the watch is here.
The work queue's metrics carry client-go's names (`workqueue_*`, labelled
with the queue's name) so dashboards built for controllers read them as is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from metal_agent.core.names import METRIC_PREFIX as P


def service_labels(key: str) -> dict[str, str]:
    """Label values for a "namespace/name" service key."""
    namespace, name = key.split("/", 1)
    return {"name": name, "namespace": namespace}


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.managed_processes = Gauge(P + "managed_processes", "llama-server processes supervised by this agent", registry=registry)
        self.process_healthy = Gauge(P + "process_healthy", "1 while the service's llama-server answers /health", ["name", "namespace"], registry=registry)
        self.process_restarts = Counter(P + "process_restarts", "llama-server restarts after a failure", ["name", "namespace"], registry=registry)
        self.respawns = Counter(P + "respawns", "llama-server respawns to apply a changed spec", ["name", "namespace"], registry=registry)
        self.startup_seconds = Histogram(
            P + "process_startup_seconds", "llama-server spawn to first healthy /health",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=registry,
        )
        self.health_check_duration = Histogram(
            P + "health_check_duration_seconds", "llama-server /health probe latency", ["name", "namespace"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry,
        )
        self.process_rss = Gauge(P + "process_rss_bytes", "resident memory of the service's llama-server", ["name", "namespace"], registry=registry)
        self.watch_consecutive_failures = Gauge(P + "watch_consecutive_failures", "consecutive failed list/watch attempts against the API server", registry=registry)
        self.watch_failures = Counter(P + "watch_failures", "failed list/watch attempts", ["resource"], registry=registry)
        self.watch_relists = Counter(P + "watch_relists", "full lists of a watched resource: initial, or expired "
                                     "(410 Gone: the resourceVersion was compacted away)", ["resource", "reason"], registry=registry)
        self.reconciles = Counter(P + "reconciles", "reconciles by outcome", ["outcome"], registry=registry)
        self.status_writes = Counter(P + "status_writes", "InferenceService status patches sent", registry=registry)
        self.fatal_exits = Counter(P + "fatal_exits", "agent exits on an unrecoverable subsystem failure, "
                                   "counted across restarts (see FatalExitLog)", ["subsystem"], registry=registry)
        self.loop_failures = Counter(P + "loop_failures", "background loop failures (each restarted after a back-off)", ["loop"], registry=registry)
        self.events_dropped = Counter(P + "events_dropped", "Kubernetes Events never delivered", ["reason"], registry=registry)
        self.http_refusals = Counter(P + "http_refusals", "requests the agent's HTTP endpoint refused, by reason "
                                     "(ForeignHost, ForeignOrigin, CrossSite, ContentTypeNotJSON, MethodNotAllowed, "
                                     "Unauthenticated, Forbidden, ReviewRateLimited, ReviewUnavailable)", ["reason"],
                                     registry=registry)
        self.token_reviews = Counter(P + "token_reviews", "TokenReviews sent to verify scrapes' bearer tokens, by lane "
                                     "(known: a recently allowed token; unknown: budgeted per source)", ["lane"],
                                     registry=registry)
        self.workqueue = WorkQueueMetrics(registry, "inferenceservices")

    def forget_service(self, namespace: str, name: str) -> None:
        """Drop a deleted service's series so dashboards do not show ghosts."""
        for metric in (self.process_healthy, self.process_restarts, self.respawns, self.health_check_duration, self.process_rss):
            try:
                metric.remove(name, namespace)
            except KeyError:
                pass


# client-go's buckets for queue and work durations: 10 ns to 10 s by decades.
_WORKQUEUE_BUCKETS = tuple(1e-8 * 10 ** i for i in range(10))


class WorkQueueMetrics:
    """client-go's workqueue metrics (names, help, buckets), bound to one queue's `name` label."""

    def __init__(self, registry: CollectorRegistry, name: str) -> None:
        self.depth = Gauge("workqueue_depth", "Current depth of workqueue", ["name"], registry=registry).labels(name)
        self.adds = Counter("workqueue_adds", "Total number of adds handled by workqueue", ["name"], registry=registry).labels(name)
        self.retries = Counter("workqueue_retries", "Total number of retries handled by workqueue", ["name"], registry=registry).labels(name)
        self.queue_duration = Histogram(
            "workqueue_queue_duration_seconds", "How long in seconds an item stays in workqueue before being requested.",
            ["name"], buckets=_WORKQUEUE_BUCKETS, registry=registry,
        ).labels(name)
        self.work_duration = Histogram(
            "workqueue_work_duration_seconds", "How long in seconds processing an item from workqueue takes.",
            ["name"], buckets=_WORKQUEUE_BUCKETS, registry=registry,
        ).labels(name)


class FatalExitLog:
    """`fatal_exits_total` that a scrape can actually see.

    The agent counts a fatal exit on its way out, after which nobody can
    scrape it. So the count is also kept in a small file in the state
    directory: the next agent (launchd starts one at once) loads it into the
    counter at start-up, and the series keeps climbing across restarts, so
    `increase()` over any window shows the exits in it. Losing the file (a
    wiped state directory) only restarts the count, as any counter reset.
    """

    def __init__(self, path: Path, counter: Counter) -> None:
        self.path = path
        self.counter = counter

    def load(self) -> None:
        """Put the exits of earlier agents into the counter (blocking: small file; call in a thread)."""
        try:
            counts = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            return  # unreadable or corrupt: start counting afresh rather than not start
        if not isinstance(counts, dict):
            return
        for subsystem, count in counts.items():
            if isinstance(subsystem, str) and isinstance(count, int) and count > 0:
                self.counter.labels(subsystem).inc(count)

    def record(self, subsystem: str) -> None:
        """Count one exit now and in the file (blocking: small file; call in a thread)."""
        self.counter.labels(subsystem).inc()
        counts = {
            sample.labels["subsystem"]: int(sample.value)
            for metric in self.counter.collect() for sample in metric.samples
            if sample.name.endswith("_total") and "subsystem" in sample.labels
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(counts, sort_keys=True))
        os.replace(tmp, self.path)
