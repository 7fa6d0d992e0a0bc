"""The agent's Prometheus metrics, with the names LLMKube's dashboards use.

One object owns them on a caller-given registry, so the daemon, tests and
benchmarks each get a clean set. Power gauges live with the power sampler
(`adapters.powermetrics`); everything about processes and the watch is here.
"""

from __future__ import annotations

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
        self.reconciles = Counter(P + "reconciles", "reconciles by outcome", ["outcome"], registry=registry)
        self.status_writes = Counter(P + "status_writes", "InferenceService status patches sent", registry=registry)
        self.fatal_exits = Counter(P + "fatal_exits", "agent exits on an unrecoverable subsystem failure", ["subsystem"], registry=registry)

    def forget_service(self, namespace: str, name: str) -> None:
        """Drop a deleted service's series so dashboards do not show ghosts."""
        for metric in (self.process_healthy, self.process_restarts, self.respawns, self.health_check_duration, self.process_rss):
            try:
                metric.remove(name, namespace)
            except KeyError:
                pass
