"""Energy from powermetrics samples, the power metrics that carry it, and host_info's facts.

The energy of a sample is its power times the window powermetrics itself
measured (the header's "(1018.73ms elapsed)"), not the nominal interval and
not the time between scrapes; the real M5 Max capture checks it end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from metal_agent.adapters.power_gauges import PowerGauges
from metal_agent.core.energy import sample_energy
from metal_agent.core.host_info import HostFacts, cpu_model_from_cpuinfo, host_info_labels
from metal_agent.core.powermetrics import PowerSample, parse_text
from tests.support.fake_powermetrics import M5_CAPTURE, M5_COMBINED_W

ELAPSED_MS = [1018.73, 1026.88, 1027.05, 1027.74, 1024.87, 1024.70, 1025.67]  # the capture's headers


def test_a_samples_energy_is_its_power_times_its_measured_window():
    got = sample_energy(PowerSample("t", 1018.73, cpu_w=0.164, gpu_w=0.007, ane_w=0.0, combined_w=0.171), 0.5)
    assert got.seconds == pytest.approx(1.01873)
    assert got.joules["combined"] == pytest.approx(0.171 * 1.01873)
    assert got.joules["cpu"] == pytest.approx(0.164 * 1.01873)
    assert got.joules["ane"] == 0.0


def test_a_header_without_its_window_counts_the_requested_interval():
    got = sample_energy(PowerSample("t", 0.0, 1.0, 0.0, 0.0, 1.0), 0.5)
    assert got.seconds == 0.5 and got.joules["combined"] == 0.5


def test_energy_of_the_real_capture(shared_dir: Path):
    samples = parse_text((shared_dir / M5_CAPTURE).read_text())
    assert [s.elapsed_ms for s in samples] == pytest.approx(ELAPSED_MS)
    total = sum(sample_energy(s, 1.0).joules["combined"] for s in samples)
    assert total == pytest.approx(sum(w * ms / 1000 for w, ms in zip(M5_COMBINED_W, ELAPSED_MS)))
    assert total == pytest.approx(3.3995, abs=1e-4)  # joules; sample-and-hold at 1 s would say 3.315


def test_the_counter_grows_by_each_samples_energy_and_survives_the_sampler_going_off():
    registry = CollectorRegistry()
    gauges = PowerGauges(registry, fallback_interval_s=1.0)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value("llmkube_metal_agent_apple_power_" + name, labels)

    assert value("energy_joules_total", component="combined") == 0.0  # exported from the start
    gauges.publish(PowerSample("t", 2000.0, 1.0, 2.0, 0.5, 3.5), received_at=1.0)
    gauges.publish(PowerSample("t", 500.0, 1.0, 2.0, 0.5, 3.5), received_at=2.0)
    gauges.off()
    assert value("combined_watts") == 0.0 and value("sampler_up") == 0.0
    assert value("energy_joules_total", component="combined") == pytest.approx(3.5 * 2.5)
    assert value("energy_joules_total", component="gpu") == pytest.approx(2.0 * 2.5)
    assert value("samples_total") == 2


def test_gpu_gauges_follow_each_sample_and_never_outlive_the_sampler(shared_dir: Path):
    registry = CollectorRegistry()
    gauges = PowerGauges(registry)

    def gpu(name: str) -> float | None:
        return registry.get_sample_value("llmkube_metal_agent_apple_gpu_" + name)

    assert (gpu("active_ratio"), gpu("active_frequency_hertz")) == (0.0, 0.0)  # exported from the start
    first, *_, last = parse_text((shared_dir / M5_CAPTURE).read_text())
    gauges.publish(first, received_at=1.0)
    assert (gpu("active_ratio"), gpu("active_frequency_hertz")) == (pytest.approx(0.0103), 338e6)
    gauges.publish(last, received_at=2.0)
    assert gpu("active_ratio") == pytest.approx(0.0536)
    # A sample without the GPU lines does not keep the previous sample's load standing.
    gauges.publish(PowerSample("t", 1000.0, 1.0, 2.0, 0.5, 3.5), received_at=3.0)
    assert (gpu("active_ratio"), gpu("active_frequency_hertz")) == (0.0, 0.0)
    gauges.publish(first, received_at=4.0)
    gauges.off()
    assert (gpu("active_ratio"), gpu("active_frequency_hertz")) == (0.0, 0.0)


def test_host_info_labels():
    facts = HostFacts("Johns-MacBook-Pro.local", "Apple M5 Max", "26.1", 137438953472)
    assert host_info_labels(facts, "0.2.0") == {
        "hostname": "Johns-MacBook-Pro.local", "chip": "Apple M5 Max", "macos_version": "26.1",
        "memory_bytes": "137438953472", "agent_version": "0.2.0"}


@pytest.mark.parametrize("text,model", [
    ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n", "Intel(R) Xeon(R) Processor"),
    ("processor\t: 0\nBogoMIPS\t: 48.00\n\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n", "Raspberry Pi 5 Model B Rev 1.0"),
    ("processor\t: 0\n", ""),
])
def test_cpu_model_from_cpuinfo(text, model):
    assert cpu_model_from_cpuinfo(text) == model
