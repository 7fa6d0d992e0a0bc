"""The front door's own Prometheus registry (the agent appends it to its /metrics).

Children are looked up once per route and kept, so the per-request cost is a
few attribute increments, not a label lookup each time.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "llmkube_metal_agent_front_door"

#: Queue waits and first bytes span sub-millisecond (a free slot) to a model load (tens of seconds).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

OUTCOMES = ("ok", "client_error", "upstream_error", "rejected", "unavailable", "refused",
            "client_gone", "bad_request", "not_found")


class FrontDoorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Requests by service and outcome.",
                                ["service", "outcome"], registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a slot or an engine.",
                                 ["service"], registry=r)
        self.inflight = Gauge(f"{PREFIX}_inflight", "Requests in flight to the engine.",
                              ["service"], registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited for a slot.",
                                    ["service"], buckets=BUCKETS, registry=r)
        self.ttfb = Histogram(f"{PREFIX}_time_to_first_byte_seconds",
                              "From the request's arrival to the first response byte sent on.",
                              ["service"], buckets=BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Streams: from the request's arrival to its first event sent on.",
                              ["service"], buckets=BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens, from the responses' usage.",
                                     ["service"], registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens",
                                         "Completion tokens, from the responses' usage.", ["service"], registry=r)
        self.usage_missing = Counter(f"{PREFIX}_usage_missing",
                                     "Completed responses that carried no usage to count (e.g. an mlx_lm.server "
                                     "stream without stream_options.include_usage).", ["service"], registry=r)
        self.cold_starts = Counter(f"{PREFIX}_cold_starts",
                                   "Times requests waited for the engine to (re)start before it served them.",
                                   ["service"], registry=r)
        self.ejections = Counter(f"{PREFIX}_ejections",
                                 "Times a failed request took the engine out of rotation (passive health).",
                                 ["service"], registry=r)
        self.energy = Counter(f"{PREFIX}_energy_joules",
                              "Energy attributed to the service's requests: each power sample's energy split "
                              "across the requests in flight during it.", ["service"], registry=r)
        self.upstream_errors = Counter(f"{PREFIX}_upstream_errors", "Failures talking to the engine.",
                                       ["service", "kind"], registry=r)
        self.table_version = Gauge(f"{PREFIX}_table_version", "Version of the routing table served.",
                                   registry=r)
        self.tables_refused = Counter(f"{PREFIX}_tables_refused", "Routing tables refused as invalid.",
                                      registry=r)

    def for_service(self, service: str) -> "ServiceMetrics":
        return ServiceMetrics(
            outcome={o: self.requests.labels(service, o) for o in OUTCOMES},
            queue_depth=self.queue_depth.labels(service), inflight=self.inflight.labels(service),
            queue_wait=self.queue_wait.labels(service), ttfb=self.ttfb.labels(service),
            connect_errors=self.upstream_errors.labels(service, "connect"),
            broken=self.upstream_errors.labels(service, "broken"),
            not_ready=self.upstream_errors.labels(service, "not_ready"),
            ttft=self.ttft.labels(service), prompt_tokens=self.prompt_tokens.labels(service),
            completion_tokens=self.completion_tokens.labels(service),
            usage_missing=self.usage_missing.labels(service), cold_starts=self.cold_starts.labels(service),
            ejections=self.ejections.labels(service), energy=self.energy.labels(service))

    def forget(self, service: str) -> None:
        """A route left the table: drop its series so /metrics does not grow for ever."""
        for metric in (self.queue_depth, self.inflight, self.queue_wait, self.ttfb, self.ttft, self.prompt_tokens,
                       self.completion_tokens, self.usage_missing, self.cold_starts, self.ejections, self.energy):
            try:
                metric.remove(service)
            except KeyError:
                pass
        for outcome in OUTCOMES:
            try:
                self.requests.remove(service, outcome)
            except KeyError:
                pass
        for kind in ("connect", "broken", "not_ready"):
            try:
                self.upstream_errors.remove(service, kind)
            except KeyError:
                pass


@dataclass
class ServiceMetrics:
    outcome: dict
    queue_depth: Gauge
    inflight: Gauge
    queue_wait: Histogram
    ttfb: Histogram
    connect_errors: Counter
    broken: Counter
    not_ready: Counter
    ttft: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    usage_missing: Counter
    cold_starts: Counter
    ejections: Counter
    energy: Counter
