"""Back-off arithmetic and llama-server log reading."""

from __future__ import annotations

import random

import pytest

from metal_agent.core.backoff import Backoff
from metal_agent.core.llama_log import parse_acceleration, problem_lines


@pytest.mark.parametrize("failures,delay", [(0, 0), (1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (50, 300)])
def test_delay_doubles_to_the_cap(failures, delay):
    assert Backoff(initial=1, factor=2, cap=300).delay(failures) == delay


@pytest.mark.parametrize("failures,delay", [(1, 0), (2, 1), (3, 2), (4, 4), (20, 300)])
def test_first_retry_can_be_immediate(failures, delay):
    assert Backoff(initial=1, factor=2, cap=300, first_immediate=True).delay(failures) == delay


def test_healthy_stretch_resets_the_count():
    b = Backoff(reset_after=120)
    assert b.failures_after_run(5, healthy_seconds=10) == 6
    assert b.failures_after_run(5, healthy_seconds=121) == 1


@pytest.mark.parametrize("jitter", [0.5, 1.0])
def test_jitter_stays_within_its_bounds_and_actually_spreads(jitter):
    b = Backoff(initial=1, factor=2, cap=30, jitter=jitter)
    rng = random.Random(7)
    for failures in (1, 3, 6, 40):
        ceiling = min(30, 2 ** (failures - 1))
        delays = [b.delay(failures, rng=rng) for _ in range(2000)]
        assert all(ceiling * (1 - jitter) <= d <= ceiling for d in delays), (failures, min(delays), max(delays))
        # Spread over the whole range, not bunched at one end: herds disperse.
        assert min(delays) < ceiling * (1 - jitter * 0.9) and max(delays) > ceiling * (1 - jitter * 0.1)


def test_no_jitter_is_deterministic_and_immediate_retries_stay_immediate():
    assert {Backoff(initial=1).delay(3) for _ in range(50)} == {4}
    assert Backoff(initial=1, jitter=1.0, first_immediate=True).delay(1) == 0


def test_a_key_failing_for_days_stays_at_the_cap():
    assert Backoff(initial=0.5, cap=60, jitter=0.5).ceiling(5000) == 60


def test_jitter_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)


METAL_LOG = """
load_tensors: loading model tensors, this can take a while... (mmap = true)
load_tensors: offloading 32 repeating layers to GPU
load_tensors: offloaded 33/33 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
load_tensors: Metal_Mapped model buffer size =  4403.49 MiB
"""

CPU_LOG = """
load_tensors: offloaded 0/3 layers to GPU
load_tensors:   CPU_Mapped model buffer size =    16.63 MiB
"""


def test_metal_offload_is_parsed():
    accel = parse_acceleration(METAL_LOG)
    assert (accel.device, accel.layers_offloaded, accel.layers_total) == ("Metal", 33, 33)


def test_cpu_fallback_is_visible():
    accel = parse_acceleration(CPU_LOG)
    assert (accel.device, accel.layers_offloaded, accel.layers_total) == ("CPU", 0, 3)


def test_build_without_gpu_reports_cpu():
    log = "warning: no usable GPU found, --gpu-layers option will be ignored\nllama_server: model loaded\n"
    accel = parse_acceleration(log)
    assert (accel.device, accel.layers_offloaded) == ("CPU", 0)
    assert accel.as_status() == {"device": "CPU", "layersOffloaded": 0}


def test_no_offload_line_means_unknown():
    assert parse_acceleration("main: server is listening\n") is None


def test_problem_lines_prefer_errors():
    text = "a\nb\nllama_init_from_model: failed to create context\nmain: exiting due to model loading error\nc\n"
    assert problem_lines(text, limit=2) == [
        "llama_init_from_model: failed to create context",
        "main: exiting due to model loading error",
    ]
    assert problem_lines("x\ny\nz\n", limit=2) == ["y", "z"]
