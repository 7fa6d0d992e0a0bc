"""Energy from powermetrics samples: watts times each sample's own measured window.

A gauge of watts scraped every N seconds and summed ("sample and hold")
misses whatever happened between scrapes and depends on the scrape interval.
powermetrics reports, for every sample, the average power over a window
whose length it measured itself (`(1018.73ms elapsed)` in the header), so
power × that window is the energy of that window, exactly. Summed into a
counter, `increase()` over any range gives joules (÷ 3.6e6: kWh) however
often Prometheus scrapes, and a restart of the agent is an ordinary counter
reset.
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.core.powermetrics import PowerSample

COMPONENTS = ("cpu", "gpu", "ane", "combined")


@dataclass(frozen=True, slots=True)
class EnergyIncrement:
    """Joules one sample adds per component, and the window they were measured over."""

    seconds: float
    joules: dict[str, float]


def sample_energy(sample: PowerSample, fallback_interval_s: float) -> EnergyIncrement:
    """The energy of one sample's window.

    A header without its elapsed time (seen on no real capture, but the parser
    accepts it) is taken to span the requested interval: the best estimate
    there is, rather than dropping the sample's energy.
    """
    seconds = sample.elapsed_ms / 1000.0 if sample.elapsed_ms > 0 else fallback_interval_s
    watts = {"cpu": sample.cpu_w, "gpu": sample.gpu_w, "ane": sample.ane_w, "combined": sample.combined_w}
    return EnergyIncrement(seconds, {component: max(w, 0.0) * seconds for component, w in watts.items()})
