"""The powermetrics parser on the real M5 Max capture and on synthetic edge cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from metal_agent.core.powermetrics import PowerParser, PowerSample, parse_lines, parse_text

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "powermetrics"
REAL_CAPTURE = "fixtures/powermetrics/m5max-mac17_6-cpu_gpu_power-1000ms.txt"

# From the capture: the cpu_power summary of each of its seven complete samples.
M5_COMBINED_W = [0.171, 0.428, 0.458, 0.356, 0.679, 0.734, 0.489]
M5_CPU_W = [0.164, 0.406, 0.432, 0.318, 0.608, 0.676, 0.438]
# First `GPU Power:` per sample; the GPU section repeats it as 7, 21, 26, 37, 71, 58, 54.
M5_GPU_W = [0.007, 0.021, 0.025, 0.038, 0.071, 0.058, 0.052]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-9) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def m5_text(shared_dir: Path) -> str:
    return (shared_dir / REAL_CAPTURE).read_text()


def test_real_capture_yields_the_seven_complete_samples(m5_text: str) -> None:
    samples = parse_text(m5_text)

    assert len(samples) == 7  # the eighth header's sample is cut off
    assert close([s.combined_w for s in samples], M5_COMBINED_W)
    assert close([s.cpu_w for s in samples], M5_CPU_W)
    assert close([s.gpu_w for s in samples], M5_GPU_W)
    assert all(s.ane_w == 0.0 for s in samples)
    assert samples[0].timestamp == "Sat Apr 25 10:34:37 2026 -0700"
    assert samples[0].elapsed_ms == pytest.approx(1018.73)
    assert samples[-1].timestamp == "Sat Apr 25 10:34:44 2026 -0700"


def test_a_sample_completes_at_its_gpu_section_power_line_not_a_whole_interval_later(m5_text: str) -> None:
    # A live sampler must publish a sample as soon as it is printed, not when
    # the next header arrives one interval later (or never, after a stall).
    lines = m5_text.splitlines()
    parser = PowerParser()
    emitted_at = [i for i, line in enumerate(lines) for _ in parser.feed(line)]

    gpu_section_lines, in_gpu = [], False
    for i, line in enumerate(lines):
        if line.startswith("*** Sampled"):
            in_gpu = False
        elif line == "**** GPU usage ****":
            in_gpu = True
        elif in_gpu and line.startswith("GPU Power:"):
            gpu_section_lines.append(i)
    assert emitted_at == gpu_section_lines
    assert len(emitted_at) == 7


def test_feeding_with_newlines_or_crlf_gives_the_same_samples(m5_text: str) -> None:
    expected = parse_text(m5_text)
    assert parse_lines(m5_text.splitlines(keepends=True)) == expected
    assert parse_lines(line + "\r\n" for line in m5_text.splitlines()) == expected


def test_older_macos_without_combined_line_sums_the_parts_and_ignores_clusters() -> None:
    samples = parse_text((FIXTURES / "synthetic-older-macos-no-combined.txt").read_text())

    assert samples == [
        PowerSample("Mon Jan  2 09:10:00 2023 +0100", 1003.12, 0.35, 0.04, 0.01, pytest.approx(0.40),
                    pytest.approx(0.021), 389e6),
        # No ANE line in this sample: it counts as 0. Its GPU section has a frequency but no residency.
        PowerSample("Mon Jan  2 09:10:01 2023 +0100", 1001.5, 2.18, 0.52, 0.0, pytest.approx(2.70), None, 1296e6),
    ]


def test_values_in_watts_and_decimals() -> None:
    samples = parse_text((FIXTURES / "synthetic-watts-and-decimals.txt").read_text())

    assert [(s.cpu_w, s.gpu_w, s.ane_w, s.combined_w) for s in samples] == [
        (1.25, 12.5, 0.5, 14.25),
        (pytest.approx(0.1645), pytest.approx(0.00725), 0.0, pytest.approx(0.17175)),
    ]
    assert [s.elapsed_ms for s in samples] == [999.5, 1000.0]


def test_partial_sample_at_end_of_stream_is_dropped() -> None:
    samples = parse_text((FIXTURES / "synthetic-partial-at-eof.txt").read_text())

    # The second sample printed all four values but never finished its GPU
    # section; at end of stream that is indistinguishable from a cut-off.
    assert [s.combined_w for s in samples] == [0.6]


def test_finish_discards_the_open_sample_so_a_reused_parser_starts_clean() -> None:
    parser = PowerParser()
    for line in ["*** Sampled system activity (A) (1ms elapsed) ***", "CPU Power: 900 mW"]:
        assert parser.feed(line) == []
    parser.finish()
    out = [s for line in ["CPU Power: 5 mW", "GPU Power: 5 mW"] for s in parser.feed(line)]
    assert out == []  # values outside any sample belong to nothing


def test_garbage_lines_are_ignored() -> None:
    samples = parse_text((FIXTURES / "synthetic-garbage.txt").read_text())

    assert samples == [PowerSample("Thu Apr  5 12:00:00 2026 +0000", 1000.0, 0.25, 0.03, 0.0, 0.28)]


def test_without_a_gpu_section_the_next_header_completes_a_sample() -> None:
    text = "\n".join(
        [
            "*** Sampled system activity (T1) (1000.0ms elapsed) ***",
            "CPU Power: 100 mW",
            "GPU Power: 20 mW",
            "*** Sampled system activity (T2) (1000.0ms elapsed) ***",
            "*** Sampled system activity (T3) ***",  # T2 had no values: not a sample
            "CPU Power: 300 mW",
            "*** Sampled system activity (T4) (1000.0ms elapsed) ***",
        ]
    )
    samples = parse_text(text)

    assert samples == [
        PowerSample("T1", 1000.0, 0.1, 0.02, 0.0, pytest.approx(0.12)),
        PowerSample("T3", 0.0, 0.3, 0.0, 0.0, 0.3),  # header without elapsed: 0.0
    ]


def test_very_long_lines_are_skipped_without_trouble() -> None:
    long_residency = "CPU 0 active residency:  14.79% (" + "1344 MHz:  11% " * 20_000 + ")"
    assert len(long_residency) > 250_000
    text = "\n".join(
        [
            "*** Sampled system activity (T) (1000.0ms elapsed) ***",
            "**** Processor usage ****",
            long_residency,
            "CPU Power: 164 mW",
            long_residency,
            "GPU Power: 7 mW",
            "ANE Power: 0 mW",
            "Combined Power (CPU + GPU + ANE): 171 mW",
            "**** GPU usage ****",
            "GPU SW requested state: (" + "P1 : 100% " * 5_000 + ")",
            "GPU Power: 7 mW",
        ]
    )
    assert parse_text(text) == [PowerSample("T", 1000.0, 0.164, 0.007, 0.0, 0.171)]


def test_sample_is_immutable() -> None:
    sample = PowerSample("T", 1.0, 0.1, 0.2, 0.3, 0.6)
    with pytest.raises(AttributeError):
        sample.cpu_w = 9.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "header",
    [
        "*** Sampled system activity (T) (1.2.3ms elapsed) ***",
        "*** Sampled system activity (T) (ms elapsed) ***",
        "*** Sampled system activity",
        "*** Sampled system activity (T (1000ms elapsed) ***",
    ],
)
def test_malformed_headers_still_open_a_sample(header: str) -> None:
    samples = parse_lines([header, "CPU Power: 10 mW", "**** GPU usage ****", "GPU Power: 2 mW"])

    assert [(s.cpu_w, s.gpu_w, s.combined_w) for s in samples] == [(0.01, 0.002, 0.012)]


# From the capture: "GPU HW active residency" and "GPU HW active frequency" of each sample.
M5_GPU_ACTIVE = [0.0103, 0.0367, 0.0391, 0.0443, 0.0796, 0.0727, 0.0536]
M5_GPU_HZ = [338e6] * 7


def test_real_capture_gives_the_gpu_busy_share_and_frequency_of_each_sample(m5_text: str) -> None:
    samples = parse_text(m5_text)

    assert close([s.gpu_active_ratio for s in samples], M5_GPU_ACTIVE)
    assert [s.gpu_active_hz for s in samples] == M5_GPU_HZ
    # The same window's idle residency is the rest: the share read is the GPU's own.
    idle = [float(line.split()[-1].rstrip("%")) / 100 for line in m5_text.splitlines()
            if line.startswith("GPU idle residency:")][:7]
    assert close([round(a + i, 4) for a, i in zip(M5_GPU_ACTIVE, idle)], [1.0] * 7)


def gpu_sample(*gpu_lines: str, before_gpu_section: tuple[str, ...] = ()) -> PowerSample:
    [sample] = parse_lines(
        ["*** Sampled system activity (T) (1000.0ms elapsed) ***", "**** Processor usage ****",
         *before_gpu_section, "CPU Power: 10 mW", "**** GPU usage ****", *gpu_lines, "GPU Power: 2 mW"]
    )
    return sample


def test_gpu_load_lines_in_other_spellings_and_units() -> None:
    hw = gpu_sample("GPU HW active frequency: 1.62 GHz", "GPU HW active residency:  99.50% (1620 MHz: 99%)")
    assert (hw.gpu_active_ratio, hw.gpu_active_hz) == (pytest.approx(0.995), pytest.approx(1.62e9))
    plain = gpu_sample("GPU active frequency: 389 MHz", "GPU active residency: 100.00%")
    assert (plain.gpu_active_ratio, plain.gpu_active_hz) == (1.0, 389e6)
    over = gpu_sample("GPU HW active residency: 100.7% (1 MHz: 100%)")
    assert over.gpu_active_ratio == 1.0  # rounding in powermetrics never makes the GPU more than busy


def test_gpu_load_is_none_when_not_printed_and_read_only_in_the_gpu_section() -> None:
    missing = gpu_sample("GPU idle residency: 100.00%")
    assert (missing.gpu_active_ratio, missing.gpu_active_hz) == (None, None)
    # Look-alikes before the GPU section (the cpu_power sampler's part) are not the GPU's.
    elsewhere = gpu_sample(before_gpu_section=("GPU HW active residency:  50.00%", "GPU HW active frequency: 900 MHz"))
    assert (elsewhere.gpu_active_ratio, elsewhere.gpu_active_hz) == (None, None)
    garbled = gpu_sample("GPU HW active residency: n/a", "GPU HW active frequency: 12 kHz",
                         "GPU HW active frequency: 444 MHz")
    assert (garbled.gpu_active_ratio, garbled.gpu_active_hz) == (None, 444e6)
