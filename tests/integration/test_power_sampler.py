"""The power sampler against a stand-in powermetrics replaying the real M5 Max capture.

The stand-in (tests/support/fake_powermetrics.py) is the one substitute
here: powermetrics cannot run on Linux. Everything else is real: the
sampler's subprocess handling, parser, gauges, watchdog, backoff and logs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from typer.testing import CliRunner

from metal_agent.adapters.powermetrics import PowerConfigError, PowerSampler, PowerSamplerSettings
from metal_agent.cli.main import app
from metal_agent.core.backoff import Backoff
from metal_agent.core.powermetrics import PowerSample
from tests.support import fake_powermetrics
from tests.support.fake_powermetrics import M5_CAPTURE, M5_COMBINED_W
from tests.support.fake_powermetrics import command as stand_in
from tests.support.wait import wait_for

FAKE = Path(fake_powermetrics.__file__).resolve()
INTERVAL_MS = 200
GAUGES = ("combined", "cpu", "gpu", "ane")


@pytest.fixture(scope="module")
def capture(shared_dir: Path) -> Path:
    return shared_dir / M5_CAPTURE


def read(registry: CollectorRegistry) -> dict[str, float]:
    def value(suffix: str) -> float:
        v = registry.get_sample_value(f"llmkube_metal_agent_apple_power_{suffix}")
        assert v is not None, suffix
        return v

    readings = {g: value(f"{g}_watts") for g in GAUGES}
    readings["up"] = value("sampler_up")
    readings["last_sample"] = value("last_sample_timestamp_seconds")
    return readings


def stand_ins_running() -> list[psutil.Process]:
    procs = []
    for child in psutil.Process().children(recursive=True):
        with suppress(psutil.NoSuchProcess):
            if str(FAKE) in child.cmdline():
                procs.append(child)
    return procs


@asynccontextmanager
async def running(sampler: PowerSampler) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sampler.run())
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
    assert not stand_ins_running(), "the sampler left its powermetrics process behind"


def exits(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] in ("powermetrics exited", "powermetrics exited again")]


async def test_gauges_follow_replayed_samples_read_zero_after_a_stall_and_a_hung_process_is_restarted(
    capture: Path, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    seen: list[tuple[float, PowerSample, dict[str, float]]] = []
    starts = tmp_path / "starts"
    sampler = PowerSampler(
        registry,
        interval_ms=INTERVAL_MS,
        stale_intervals=3,
        hung_intervals=8,
        backoff=Backoff(initial=0.1, cap=0.1, reset_after=60.0),
        # Gauges as they stand the moment each sample is published.
        on_sample=lambda s: seen.append((time.monotonic(), s, read(registry))),
        # 300 KB junk lines: far beyond asyncio's default 64 KiB line limit.
        executable_override_for_tests=stand_in(
            capture, "--after", "stall", "--starts-file", str(starts), "--long-line-bytes", "300000"
        ),
    )
    assert read(registry) == dict.fromkeys([*GAUGES, "up", "last_sample"], 0.0)

    with capture_logs() as logs:
        async with running(sampler):
            await wait_for(lambda: len(seen) >= 7, timeout=30, what="the seven replayed samples")
            last_at = seen[6][0]
            zeroed_at = await wait_for(
                lambda: read(registry)["combined"] == 0 and time.monotonic(), timeout=10, what="combined gauge back to 0"
            )
            after_stall = read(registry)
            stand_in_alive, starts_at_zero = bool(stand_ins_running()), sampler.starts
            # Still silent after `hung_intervals`: killed and started again, replaying anew.
            await wait_for(lambda: len(seen) >= 8, timeout=30, what="a sample from the restarted stand-in")
            restarted_at = time.monotonic()

    assert [s.combined_w for _, s, _ in seen[:8]] == [*M5_COMBINED_W, M5_COMBINED_W[0]]
    for _, sample, gauges in seen[:7]:
        assert (gauges["combined"], gauges["cpu"], gauges["gpu"], gauges["ane"]) == (
            sample.combined_w,
            sample.cpu_w,
            sample.gpu_w,
            sample.ane_w,
        )
        assert gauges["up"] == 1
        assert abs(gauges["last_sample"] - time.time()) < 60
    assert seen[6][2]["gpu"] == 0.052  # the first GPU line of the sample, not the repeat (54 mW)

    # Stale after three intervals of silence, not before; the process still lives.
    assert zeroed_at - last_at >= 3 * INTERVAL_MS / 1000 - 0.02
    assert {k: after_stall[k] for k in (*GAUGES, "up")} == dict.fromkeys([*GAUGES, "up"], 0.0)
    assert after_stall["last_sample"] == seen[6][2]["last_sample"]
    assert stand_in_alive and starts_at_zero == 1

    assert restarted_at - last_at >= 8 * INTERVAL_MS / 1000
    hung = [e for e in logs if e["event"] == "powermetrics stopped delivering samples; restarting it"]
    assert len(hung) == 1
    killed = exits(logs)[0]
    assert killed["returncode"] == -15 and killed["samples"] == 7  # SIGTERM
    assert len(starts.read_text().splitlines()) == 2


async def test_exit_marks_the_sampler_down_and_restarts_it_with_backoff(capture: Path, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    seen: list[PowerSample] = []
    starts = tmp_path / "starts"
    sampler = PowerSampler(
        registry,
        interval_ms=INTERVAL_MS,
        backoff=Backoff(initial=0.3, factor=2.0, cap=5.0, reset_after=60.0),
        stale_intervals=100,  # keep the watchdog out of it: only the exit may zero the gauges
        hung_intervals=100,
        on_sample=seen.append,
        executable_override_for_tests=stand_in(
            capture,
            *("--after", "exit", "--samples", "2", "--partial", "--exit-code", "3"),
            *("--stderr", "sudo: a password is required", "--starts-file", str(starts)),
        ),
    )
    with capture_logs() as logs:
        async with running(sampler):
            await wait_for(lambda: len(exits(logs)) >= 3, timeout=30, what="three exits of the stand-in")
            down = read(registry)

    assert down["up"] == 0 and all(down[g] == 0 for g in GAUGES)
    # Two complete samples per run; the cut-off third (458 mW) is never published.
    assert [s.combined_w for s in seen[:6]] == [0.171, 0.428] * 3
    assert 0.458 not in [s.combined_w for s in seen]

    assert [e["restart_in_s"] for e in exits(logs)[:3]] == [0.3, 0.6, 1.2]
    warnings = [e for e in logs if e["event"] == "powermetrics exited"]
    assert len(warnings) == 1, "the same failure must be logged once, not per retry"
    (warning,) = warnings
    assert warning["log_level"] == "warning"
    assert warning["returncode"] == 3
    assert warning["stderr_tail"] == "sudo: a password is required"
    assert "make install-powermetrics-sudo" in warning["hint"]
    assert warning["argv"][-4:] == ["--samplers", "cpu_power,gpu_power", "-i", str(INTERVAL_MS)]

    # The delays are really waited: each gap is the run (2 intervals) plus the backoff.
    t = [float(line) for line in starts.read_text().splitlines()]
    assert len(t) >= 3
    assert t[1] - t[0] >= 0.4 + 0.3
    assert t[2] - t[1] >= 0.4 + 0.6


async def test_distinct_failures_are_each_logged(capture: Path, tmp_path: Path) -> None:
    sampler = PowerSampler(
        CollectorRegistry(),
        interval_ms=INTERVAL_MS,
        backoff=Backoff(initial=0.1, cap=0.1, reset_after=60.0),
        executable_override_for_tests=stand_in(
            capture,
            *("--samples", "0", "--after", "exit", "--starts-file", str(tmp_path / "starts")),
            *("--stderr", "failure {start}"),  # a different message every start
        ),
    )
    with capture_logs() as logs:
        async with running(sampler):
            await wait_for(lambda: len(exits(logs)) >= 3, timeout=30, what="three exits")

    assert [(e["event"], e["stderr_tail"]) for e in exits(logs)[:3]] == [
        ("powermetrics exited", f"failure {n}") for n in (1, 2, 3)
    ]


async def test_a_healthy_run_resets_the_backoff(capture: Path) -> None:
    sampler = PowerSampler(
        CollectorRegistry(),
        interval_ms=INTERVAL_MS,
        # Three samples take 0.4 s after the first one: more than reset_after.
        backoff=Backoff(initial=0.1, factor=2.0, cap=5.0, reset_after=0.3),
        executable_override_for_tests=stand_in(capture, "--samples", "3", "--after", "exit"),
    )
    with capture_logs() as logs:
        async with running(sampler):
            await wait_for(lambda: len(exits(logs)) >= 3, timeout=30, what="three exits")

    assert [e["restart_in_s"] for e in exits(logs)[:3]] == [0.1, 0.1, 0.1]
    # After a healthy stretch the same failure is news again.
    assert [e["event"] for e in exits(logs)[:3]] == ["powermetrics exited"] * 3


async def test_a_command_that_cannot_start_is_retried_and_explained(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    sampler = PowerSampler(
        registry,
        interval_ms=INTERVAL_MS,
        backoff=Backoff(initial=0.1, cap=0.1, reset_after=60.0),
        executable_override_for_tests=[str(tmp_path / "no-such-powermetrics")],
    )
    with capture_logs() as logs:
        async with running(sampler):
            await wait_for(lambda: sampler.starts >= 3, timeout=30, what="three start attempts")

    (warning,) = [e for e in logs if e["event"] == "powermetrics exited"]
    assert warning["returncode"] is None
    assert "FileNotFoundError" in warning["stderr_tail"]
    assert read(registry)["up"] == 0


def test_the_real_argv_is_the_pinned_one_and_its_path_cannot_be_configured() -> None:
    sampler = PowerSampler(CollectorRegistry(), interval_ms=1500)
    assert sampler.argv == (
        "/usr/bin/sudo",
        "-n",
        "/usr/bin/powermetrics",
        "--samplers",
        "cpu_power,gpu_power",
        "-i",
        "1500",
    )

    for key in ("powermetrics_path", "powermetrics", "sudo_path", "argv", "command", "executable"):
        with pytest.raises(PowerConfigError, match="cannot be configured"):
            PowerSamplerSettings.from_mapping({key: "/tmp/evil", "interval_ms": 1000})
    with pytest.raises(PowerConfigError, match="unknown setting"):
        PowerSamplerSettings.from_mapping({"intervalms": 1000})
    with pytest.raises(PowerConfigError, match="interval_ms"):
        PowerSamplerSettings.from_mapping({"interval_ms": 10})
    assert PowerSamplerSettings.from_mapping({"interval_ms": 500, "enabled": False}) == PowerSamplerSettings(
        enabled=False, interval_ms=500
    )
    assert PowerSamplerSettings.from_mapping({}) == PowerSamplerSettings(enabled=True, interval_ms=1000)


def test_cli_power_parse_prints_one_json_object_per_sample(capture: Path) -> None:
    runner = CliRunner()
    from_file = runner.invoke(app, ["power", "parse", str(capture)])
    from_stdin = runner.invoke(app, ["power", "parse", "-"], input=capture.read_text())

    assert from_file.exit_code == 0, from_file.output
    rows = [json.loads(line) for line in from_file.stdout.splitlines()]
    assert [r["combined_watts"] for r in rows] == M5_COMBINED_W
    assert rows[0] == {
        "timestamp": "Sat Apr 25 10:34:37 2026 -0700",
        "elapsed_ms": 1018.73,
        "cpu_watts": 0.164,
        "gpu_watts": 0.007,
        "ane_watts": 0.0,
        "combined_watts": 0.171,
    }
    assert from_stdin.exit_code == 0 and from_stdin.stdout == from_file.stdout

    missing = runner.invoke(app, ["power", "parse", "/nonexistent/capture.txt"])
    assert missing.exit_code == 1 and "cannot read" in missing.stderr


def test_cli_render_sudoers() -> None:
    runner = CliRunner()
    good = runner.invoke(app, ["render-sudoers", "--user", "alice", "--interval-ms", "500"])
    assert good.exit_code == 0
    assert "alice ALL = (root) NOPASSWD: LLMKUBE_POWERMETRICS" in good.stdout
    assert "-i 500\n" in good.stdout

    for bad in (["--user", "root"], ["--user", "alice bob"], ["--user", "alice", "--interval-ms", "5"]):
        result = runner.invoke(app, ["render-sudoers", *bad])
        assert result.exit_code == 2 and result.stdout == ""
        assert "error:" in result.stderr
