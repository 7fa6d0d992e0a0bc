"""The power metrics on a caller-owned registry: gauges InferCost reads, and energy.

The four `*_watts` gauges are exactly what InferCost scrapes and read 0 when
the sampler is off (InferCost's "sampler off"). `sampler_up` and
`last_sample_timestamp_seconds` tell an off sampler from a real 0 W. The
energy counter (`energy_joules_total{component}`) integrates every sample
over its own measured window (core/energy.py), so `increase()` gives exact
joules whatever the scrape interval; `samples_total` counts the samples it
was made from.

The GPU's load sits beside the watts, in the same `apple_` family:
`gpu_active_ratio` (the gpu_power sampler's "GPU HW active residency", 0..1:
how busy the GPU was, as DCGM's utilisation is for an NVIDIA card) and
`gpu_active_frequency_hertz` (its average frequency while active). Like the
watts they read 0 while the sampler is off, so a dead sampler never shows
a busy GPU; `sampler_up` tells that 0 from an idle GPU.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from metal_agent.core.energy import COMPONENTS, sample_energy
from metal_agent.core.powermetrics import PowerSample

METRIC_PREFIX = "llmkube_metal_agent_apple_power_"
GPU_PREFIX = "llmkube_metal_agent_apple_gpu_"


class PowerGauges:
    """The power gauges on a caller-owned registry (the daemon's, or a test's).

    ``sampler_up`` is 1 only while samples are arriving: it goes to 0 when
    powermetrics fails or stalls, together with the four power gauges. The
    energy counter only ever grows, by each sample's measured energy.
    """

    def __init__(self, registry: CollectorRegistry, *, fallback_interval_s: float = 1.0) -> None:
        def gauge(suffix: str, doc: str) -> Gauge:
            return Gauge(METRIC_PREFIX + suffix, doc, registry=registry)

        self.combined = gauge("combined_watts", "CPU+GPU+ANE power from powermetrics, watts; 0 when the sampler is off.")
        self.gpu = gauge("gpu_watts", "GPU power from powermetrics, watts; 0 when the sampler is off.")
        self.cpu = gauge("cpu_watts", "CPU power from powermetrics, watts; 0 when the sampler is off.")
        self.ane = gauge("ane_watts", "Neural Engine power from powermetrics, watts; 0 when the sampler is off.")
        self.up = gauge("sampler_up", "1 while powermetrics is running and delivering samples, else 0.")
        self.last_sample = gauge(
            "last_sample_timestamp_seconds", "Unix time the last powermetrics sample was received; 0 if never."
        )
        self.energy = Counter(
            METRIC_PREFIX + "energy_joules",
            "Energy measured by powermetrics, joules: each sample's power times its own measured window.",
            ["component"], registry=registry,
        )
        self.gpu_active = Gauge(
            GPU_PREFIX + "active_ratio",
            "GPU busy share of the last powermetrics window (GPU HW active residency), 0..1; 0 when the sampler is off.",
            registry=registry,
        )
        self.gpu_frequency = Gauge(
            GPU_PREFIX + "active_frequency_hertz",
            "GPU average frequency while active in the last powermetrics window, hertz; 0 when idle or the sampler is off.",
            registry=registry,
        )
        self.samples = Counter(METRIC_PREFIX + "samples", "powermetrics samples received.", registry=registry)
        self._energy = {component: self.energy.labels(component) for component in COMPONENTS}  # 0 from the start
        self._fallback_interval_s = fallback_interval_s

    def publish(self, sample: PowerSample, received_at: float) -> None:
        self.combined.set(sample.combined_w)
        self.gpu.set(sample.gpu_w)
        self.cpu.set(sample.cpu_w)
        self.ane.set(sample.ane_w)
        # A sample without the GPU lines (a layout we do not know) reads 0, never the previous value.
        self.gpu_active.set(sample.gpu_active_ratio or 0.0)
        self.gpu_frequency.set(sample.gpu_active_hz or 0.0)
        for component, joules in sample_energy(sample, self._fallback_interval_s).joules.items():
            self._energy[component].inc(joules)
        self.samples.inc()
        self.last_sample.set(received_at)
        self.up.set(1)

    def off(self) -> None:
        """No fresh data: zero the power and GPU gauges (never leave a stale value) and mark down."""
        for g in (self.combined, self.gpu, self.cpu, self.ane, self.gpu_active, self.gpu_frequency, self.up):
            g.set(0)
