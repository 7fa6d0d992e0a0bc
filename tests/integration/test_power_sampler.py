"""The power sampler against a stand-in powermetrics replaying the real M5 Max capture.

The stand-in (tests/support/fake_powermetrics.py) is the one substitute
here: powermetrics cannot run on Linux. Everything else is real: the
sampler's subprocess handling, parser, gauges, watchdog, backoff and logs.

The last tests (root, in CI or with METAL_AGENT_PRIVILEGED_TESTS=1) run the
sampler the way the agent runs it on a Mac: as a non-root user, executing its
real pinned argv through the real sudo and a real sudoers grant, with the
stand-in installed as /usr/bin/powermetrics. They cover both ways sudo can
leave the agent with a root child: one sudo relays signals to, and one the
agent may not signal at all (EPERM), which is what issue 13 is about.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from typer.testing import CliRunner

from metal_agent import __version__
from metal_agent.adapters.powermetrics import PowerConfigError, PowerSampler, PowerSamplerSettings
from metal_agent.cli.main import app
from metal_agent.core.backoff import Backoff
from metal_agent.core.powermetrics import PowerSample
from metal_agent.core.sudoers import POWERMETRICS_PATH, SUDO_PATH, render_sudoers, sampler_argv
from tests.support import fake_powermetrics
from tests.support.fake_powermetrics import M5_CAPTURE, M5_COMBINED_W, exclusive_stand_in_slot, stand_in_script
from tests.support.fake_powermetrics import command as stand_in
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
FAKE = Path(fake_powermetrics.__file__).resolve()
INTERVAL_MS = 200
GAUGES = ("combined", "cpu", "gpu", "ane")
GPU_LOAD = {"gpu_active": "active_ratio", "gpu_hz": "active_frequency_hertz"}
# The capture's "GPU HW active residency" per sample (its frequency is 338 MHz in all seven).
M5_GPU_ACTIVE = [0.0103, 0.0367, 0.0391, 0.0443, 0.0796, 0.0727, 0.0536]


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
    for key, name in GPU_LOAD.items():
        gpu = registry.get_sample_value(f"llmkube_metal_agent_apple_gpu_{name}")
        assert gpu is not None, name
        readings[key] = gpu
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
    assert read(registry) == dict.fromkeys([*GAUGES, *GPU_LOAD, "up", "last_sample"], 0.0)

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
    # The GPU's load beside the watts, from the same samples.
    assert [round(g["gpu_active"], 6) for _, _, g in seen[:7]] == M5_GPU_ACTIVE
    assert {g["gpu_hz"] for _, _, g in seen[:7]} == {338e6}

    # Stale after three intervals of silence, not before; the process still lives.
    assert zeroed_at - last_at >= 3 * INTERVAL_MS / 1000 - 0.02
    assert {k: after_stall[k] for k in (*GAUGES, *GPU_LOAD, "up")} == dict.fromkeys([*GAUGES, *GPU_LOAD, "up"], 0.0)
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

    assert down["up"] == 0 and all(down[g] == 0 for g in (*GAUGES, *GPU_LOAD))
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
    assert warning["argv"][-6:] == ["--samplers", "cpu_power,gpu_power", "-i", str(INTERVAL_MS), "-n", "3600"]

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
        "-n",
        "3600",
    )

    for key in ("powermetrics_path", "powermetrics", "sudo_path", "argv", "command", "executable"):
        with pytest.raises(PowerConfigError, match="cannot be configured") as refused:
            PowerSamplerSettings.from_mapping({key: "/tmp/evil", "interval_ms": 1000})
        assert "-i <interval_ms> -n 3600`" in str(refused.value)
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
        "gpu_active_ratio": 0.0103,
        "gpu_active_frequency_hertz": 338e6,
    }
    assert from_stdin.exit_code == 0 and from_stdin.stdout == from_file.stdout

    missing = runner.invoke(app, ["power", "parse", "/nonexistent/capture.txt"])
    assert missing.exit_code == 1 and "cannot read" in missing.stderr


def test_cli_render_sudoers() -> None:
    runner = CliRunner()
    good = runner.invoke(app, ["render-sudoers", "--user", "alice", "--interval-ms", "500"])
    assert good.exit_code == 0
    assert "alice ALL = (root) NOPASSWD: LLMKUBE_POWERMETRICS" in good.stdout
    assert "-i 500 -n 3600\n" in good.stdout

    for bad in (["--user", "root"], ["--user", "alice bob"], ["--user", "alice", "--interval-ms", "5"]):
        result = runner.invoke(app, ["render-sudoers", *bad])
        assert result.exit_code == 2 and result.stdout == ""
        assert "error:" in result.stderr


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def alive(pid: int, marker: Path | str) -> bool:
    """The stand-in with this pid is still running: the pid is alive, not a zombie (a zombie is
    dead: it only waits for whoever inherited it to reap it; once the sampler's process has
    exited that is init, which in some containers never reaps), and its command line still
    names `marker` (its options or pids file). Without that last check a busy machine fails the
    test at random: with pid_max 32768, the dead stand-in's pid is soon another process's."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and str(marker) in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return False


def gone_and_reaped(pid: int, marker: Path | str) -> bool:
    """The stand-in exited and its parent (the sampler) reaped it: no zombie is left with its pid,
    and no live process with its pid is it (a later process may have been given the pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and str(marker) not in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return True


def completions(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "powermetrics finished its pinned samples; starting the next run"]


async def test_a_run_that_finishes_its_pinned_samples_is_restarted_at_once_not_as_a_failure(
    capture: Path, tmp_path: Path
) -> None:
    """`-n N` ends every run; that end must cost nothing: no backoff, no warning, no zeroed gauges.

    The backoff is made long (5 s) so that a restart treated as a failure
    would show in the start times, and the stale window is short enough that
    a restart that let the gauges go stale would be logged.
    """
    registry = CollectorRegistry()
    seen: list[float] = []
    starts, pids = tmp_path / "starts", tmp_path / "pids"
    sampler = PowerSampler(
        registry,
        interval_ms=INTERVAL_MS,
        samples_per_run=3,
        backoff=Backoff(initial=5.0, cap=5.0, reset_after=60.0),
        stale_intervals=5,
        hung_intervals=20,
        on_sample=lambda s: seen.append(s.combined_w),
        executable_override_for_tests=stand_in(
            capture, "--after", "loop", "--starts-file", str(starts), "--pids-file", str(pids)
        ),
    )
    with capture_logs() as logs:
        async with running(sampler):
            await wait_for(lambda: len(completions(logs)) >= 3, timeout=30, what="three runs of 3 samples")
            finished = pids_in(pids)[:3]
            finished_alive = [pid for pid in finished if not gone_and_reaped(pid, pids)]
            up_between_runs = read(registry)["up"]

    assert seen[:9] == M5_COMBINED_W[:3] * 3  # each run replays from the start: three fresh runs
    assert [(e["returncode"], e["samples"], e["restart_in_s"]) for e in completions(logs)[:3]] == [(0, 3, 0.0)] * 3
    assert not [e for e in logs if e["log_level"] == "warning" and "stand-in" not in e["event"]], "a normal end is no failure"
    assert up_between_runs == 1
    t = [float(line) for line in starts.read_text().splitlines()]
    assert all(b - a < 3 * INTERVAL_MS / 1000 + 5.0 for a, b in zip(t, t[1:4])), "a finished run was restarted with backoff"
    assert len(finished) == 3 and finished_alive == [], "a finished run's process was left behind"


async def test_a_powermetrics_deaf_to_sigterm_is_ended_by_closing_its_pipe(capture: Path, tmp_path: Path) -> None:
    """The pipe, not the signal, ends a run: a stand-in that ignores SIGTERM dies of SIGPIPE at its next write.

    This runs unprivileged (the stand-in is the test's own child), so it shows
    the mechanism everywhere; the tests below show it through real sudo,
    where the agent's signal is refused outright.
    """
    pids = tmp_path / "pids"
    seen: list[PowerSample] = []
    sampler = PowerSampler(
        CollectorRegistry(),
        interval_ms=INTERVAL_MS,
        on_sample=seen.append,
        executable_override_for_tests=stand_in(
            capture, "--after", "loop", "--ignore-sigterm", "--pids-file", str(pids)
        ),
    )
    with capture_logs() as logs:
        async with running(sampler):
            await wait_for(lambda: len(seen) >= 2, timeout=30, what="samples from the stand-in")

    (over,) = [e for e in logs if e["event"] == "powermetrics run over"]
    assert over["returncode"] == -13 and not over["abandoned"]  # SIGPIPE, not SIGTERM (-15) nor SIGKILL (-9)
    assert gone_and_reaped(pids_in(pids)[0], pids)


# -- through the real sudo, as a throw-away non-root user ------------------------------------------
#
# The sampler runs in its own process as a throw-away user (the "agent"), and
# executes its real, pinned argv: /usr/bin/sudo -n /usr/bin/powermetrics ...
# sudo is the real one, judging a real sudoers grant; only /usr/bin/powermetrics
# is a stand-in (it cannot exist on Linux), replaying the real M5 Max capture.
#
# Two grants cover the two ways sudo can leave the agent with a root child:
# - "sudo relays signals": the distribution's defaults. Since sudo 1.9.5 the
#   front-end keeps the invoking user's real uid, so the user may signal it and
#   sudo relays SIGTERM to the command.
# - "sudo runs it as full root": no PAM session or credentials and no pty, so
#   sudoers defines no close function and sudo executes the command in its own
#   place: the agent's child is powermetrics itself, all uids 0, and every
#   signal from the agent fails with EPERM. That is the situation of issue 13
#   (and of every sudo before 1.9.5, whose front-end made itself full root "so
#   user cannot kill us").

PRIVILEGED = hasattr(os, "geteuid") and os.geteuid() == 0 and (
    bool(os.environ.get("CI")) or os.environ.get("METAL_AGENT_PRIVILEGED_TESTS") == "1"
)
needs_root_and_sudo = pytest.mark.skipif(
    not PRIVILEGED,
    reason="changes users, /etc/sudoers.d and /usr/bin/powermetrics: runs only as root with CI or "
    "METAL_AGENT_PRIVILEGED_TESTS=1 set",
)
SUDO_INTERVAL_MS = 200
SUDO_SAMPLES = 3
RELAY, FULL_ROOT = "sudo relays signals", "sudo runs it as full root"

# Runs as root only until the imports are done, then drops to the user for good
# (real, effective and saved ids), because the interpreter may live where the
# user cannot read (e.g. under /root). Everything the sampler will import later
# is imported before the drop. Prints one JSON object per line: the sampler's
# log events and its samples. Closing its stdin stops the sampler.
DRIVER = r"""
import asyncio, asyncio.subprocess, concurrent.futures.thread, json, os, pwd, sys
import structlog
from prometheus_client import CollectorRegistry
from metal_agent.adapters.powermetrics import PowerSampler
from metal_agent.core.backoff import Backoff

user = sys.argv[1]
interval_ms, samples, stale, hung = map(int, sys.argv[2:6])

def emit(**fields):
    sys.stdout.write(json.dumps(fields, default=str) + "\n")
    sys.stdout.flush()

def to_stdout(_logger, _method, event_dict):
    emit(**event_dict)
    raise structlog.DropEvent

structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info, to_stdout])
pw = pwd.getpwnam(user)
os.setgroups([])
os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
try:
    os.setuid(0)
except PermissionError:
    pass
else:
    raise SystemExit("the driver could become root again")

async def main():
    sampler = PowerSampler(
        CollectorRegistry(), interval_ms=interval_ms, samples_per_run=samples,
        stale_intervals=stale, hung_intervals=hung,
        backoff=Backoff(initial=0.2, factor=2.0, cap=0.8, reset_after=60.0),
        on_sample=lambda s: emit(event="sample", combined_w=s.combined_w, start=sampler.starts),
    )
    emit(event="driver started", uids=os.getresuid(), argv=list(sampler.argv))
    task = asyncio.create_task(sampler.run())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    emit(event="driver stopped", abandoned=sampler.abandoned_pids, starts=sampler.starts)

asyncio.run(main())
"""


@dataclass
class SudoPower:
    users: dict[str, str]  # variant -> throw-away user holding the grant
    options: Path  # the stand-in's options, read at each of its starts
    pids: Path  # every stand-in start appends its pid
    work: Path

    def steer(self, *options: str) -> None:
        self.pids.write_text("")
        self.options.write_text(" ".join([*map(shlex.quote, options), "--pids-file", str(self.pids)]))

    def leftovers(self) -> list[psutil.Process]:
        """This fixture's stand-ins, and sudo processes of its users, still alive (any uid: the test is root).

        Other test runs in the same checkout may have stand-ins of their own;
        only processes started through this fixture's grant count.
        """
        uids = {pwd.getpwnam(name).pw_uid for name in self.users.values()}
        found = []
        for proc in psutil.process_iter(["cmdline", "uids"]):
            cmdline = proc.info["cmdline"] or []
            ours = str(self.options) in cmdline
            our_sudo = cmdline[:1] == [SUDO_PATH] and POWERMETRICS_PATH in cmdline and proc.info["uids"].real in uids
            if ours or our_sudo:
                found.append(proc)
        return found


def _system_tool(name: str) -> str:
    path = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{name} is required for the privileged tests", pytrace=False)
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def sudo_power(shared_dir: Path) -> Iterator[SudoPower]:
    for tool in ("useradd", "userdel", "visudo"):
        _system_tool(tool)
    with exclusive_stand_in_slot():
        if Path(POWERMETRICS_PATH).exists():
            pytest.skip(f"{POWERMETRICS_PATH} exists; this test only installs a stand-in where there is none")
        work = Path(tempfile.mkdtemp(prefix="metal-agent-power-sudo-"))
        fragment = Path("/etc/sudoers.d") / f"metal-agent-test-{secrets.token_hex(4)}"
        users: dict[str, str] = {}
        installed = False
        try:
            work.chmod(0o755)
            for variant in (RELAY, FULL_ROOT):
                name = "mapw" + secrets.token_hex(4)
                result = _run(_system_tool("useradd"), "--no-create-home", "--shell", "/usr/sbin/nologin", name)
                assert result.returncode == 0, result.stderr
                users[variant] = name
            options, pids = work / "options", work / "pids"
            options.write_text("")
            Path(POWERMETRICS_PATH).write_text(stand_in_script(shared_dir / M5_CAPTURE, options))
            installed = True
            Path(POWERMETRICS_PATH).chmod(0o755)
            text = render_sudoers(users[RELAY], SUDO_INTERVAL_MS, samples=SUDO_SAMPLES, version=__version__) + (
                f"{users[FULL_ROOT]} ALL = (root) NOPASSWD: LLMKUBE_POWERMETRICS\n"
                f"Defaults:{users[FULL_ROOT]} !pam_session, !pam_setcred, !use_pty\n"
            )
            staged = work / "fragment"
            staged.write_text(text)
            check = _run(_system_tool("visudo"), "-cf", str(staged))
            assert check.returncode == 0, check.stdout + check.stderr
            shutil.copyfile(staged, fragment)
            fragment.chmod(0o440)
            power = SudoPower(users, options, pids, work)
            yield power
        finally:
            fragment.unlink(missing_ok=True)
            if users:
                for proc in SudoPower(users, work / "options", work / "pids", work).leftovers():
                    with suppress(psutil.NoSuchProcess):
                        proc.kill()
            if installed:
                Path(POWERMETRICS_PATH).unlink(missing_ok=True)
            for name in users.values():
                _run(_system_tool("userdel"), name)
            shutil.rmtree(work, ignore_errors=True)


class Driver:
    """The sampler in its own process, as the throw-away user; its events as they arrive."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]

    def tail(self) -> str:
        return "\n".join(json.dumps(e) for e in self.events[-15:])

    async def stop(self) -> int:
        """Close its stdin (the stop request) and wait for it to finish on its own."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = await asyncio.wait_for(self.proc.wait(), timeout=30)
        await asyncio.wait_for(self._reader, timeout=5)
        return rc


@asynccontextmanager
async def sampler_as(power: SudoPower, variant: str, *, stale: int = 3, hung: int = 10) -> AsyncIterator[Driver]:
    errors = power.work / "driver.stderr"
    with errors.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DRIVER, power.users[variant],
            *map(str, (SUDO_INTERVAL_MS, SUDO_SAMPLES, stale, hung)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            cwd=str(REPO),
            # No controlling terminal, as under launchd: otherwise sudo's use_pty
            # would interpose a pseudo-terminal that launchd never gives it.
            start_new_session=True,
        )
    driver = Driver(proc)
    try:
        await wait_for(lambda: driver.named("driver started") or proc.returncode is not None, timeout=30,
                       what="the sampler process to start", on_timeout=errors.read_text)
        assert proc.returncode is None, errors.read_text()
        yield driver
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        driver._reader.cancel()


def sampler_child(driver: Driver) -> tuple[list[str], tuple[int, int, int]]:
    """Command line and real/effective/saved uid of the sampler process's child (sudo, or what sudo became)."""
    (child,) = psutil.Process(driver.proc.pid).children()
    return child.cmdline(), tuple(child.uids())  # type: ignore[return-value]


@pytest.mark.privileged
@needs_root_and_sudo
@pytest.mark.parametrize("variant", [RELAY, FULL_ROOT])
async def test_through_real_sudo_runs_end_after_n_samples_and_restart_and_stop_leaves_nothing(
    sudo_power: SudoPower, variant: str
) -> None:
    """Through real sudo, as a non-root user: each run ends itself after the pinned `-n 3`, the next
    starts at once, a finished run leaves no process, and a stop request ends the last run too,
    whether or not the user may signal it (the pipe is closed; the stand-in dies at its next write)."""
    sudo_power.steer("--after", "loop")
    async with sampler_as(sudo_power, variant, stale=5) as driver:
        assert driver.named("driver started")[0]["argv"] == sampler_argv(SUDO_INTERVAL_MS, SUDO_SAMPLES)
        # A run lasts 3 samples: after its first one, its process is sudo's settled outcome.
        await wait_for(lambda: driver.named("sample"), timeout=30, what="a first sample", on_timeout=driver.tail)
        child_cmdline, uids = sampler_child(driver)
        done = lambda: [e for e in driver.named("powermetrics finished its pinned samples; starting the next run")]  # noqa: E731
        await wait_for(lambda: len(done()) >= 3, timeout=60, what="three runs of 3 samples", on_timeout=driver.tail)
        finished = pids_in(sudo_power.pids)[:3]
        finished_alive = [pid for pid in finished if not gone_and_reaped(pid, sudo_power.options)]
        sudo_children = len(psutil.Process(driver.proc.pid).children())
        running_before_stop = driver.proc.returncode is None
        rc = await driver.stop()

    if variant == RELAY:
        assert child_cmdline[0] == SUDO_PATH, "premise: sudo stays the agent's child"
        assert uids[0] == pwd.getpwnam(sudo_power.users[RELAY]).pw_uid and uids[1] == 0, (
            "premise: sudo's front-end keeps the user's real uid (so the user may signal it)"
        )
    else:
        assert str(sudo_power.options) in child_cmdline, "premise: sudo executed powermetrics in its own place"
        assert uids == (0, 0, 0), "premise: the agent's child is full root, out of its reach"
    samples = [e["combined_w"] for e in driver.named("sample")]
    assert samples[:9] == M5_COMBINED_W[:3] * 3
    assert [(e["returncode"], e["samples"], e["restart_in_s"]) for e in done()[:3]] == [(0, 3, 0.0)] * 3
    assert not driver.named("powermetrics exited"), driver.tail()
    assert finished_alive == [] and sudo_children <= 1
    assert running_before_stop and rc == 0
    (stopped,) = driver.named("driver stopped")
    assert stopped["abandoned"] == []
    assert sudo_power.leftovers() == [], "a powermetrics (or its sudo) outlived the stop"


@pytest.mark.privileged
@needs_root_and_sudo
@pytest.mark.parametrize("variant", [RELAY, FULL_ROOT])
async def test_through_real_sudo_a_dying_powermetrics_is_restarted_and_the_sampler_lives_on(
    sudo_power: SudoPower, variant: str
) -> None:
    """A powermetrics that keeps failing costs samples, never the sampler: each exit (status passed
    through sudo) is restarted with growing backoff, the process never exits, nothing is left."""
    sudo_power.steer("--after", "exit", "--samples", "2", "--exit-code", "3", "--stderr", "powermetrics: simulated failure")
    async with sampler_as(sudo_power, variant) as driver:
        exited = lambda: driver.named("powermetrics exited") + driver.named("powermetrics exited again")  # noqa: E731
        await wait_for(lambda: len(exited()) >= 3, timeout=60, what="three failed runs", on_timeout=driver.tail)
        still_running = driver.proc.returncode is None
        rc = await driver.stop()

    assert still_running and rc == 0
    (warning,) = driver.named("powermetrics exited")
    assert warning["returncode"] == 3 and warning["stderr_tail"] == "powermetrics: simulated failure"
    assert [e["restart_in_s"] for e in exited()[:3]] == [0.2, 0.4, 0.8]
    assert len({e["start"] for e in driver.named("sample")}) >= 3, "every restarted run delivered samples"
    assert not [pid for pid in pids_in(sudo_power.pids) if alive(pid, sudo_power.options)]
    assert sudo_power.leftovers() == []


@pytest.mark.privileged
@needs_root_and_sudo
@pytest.mark.parametrize("variant", [RELAY, FULL_ROOT])
async def test_through_real_sudo_a_stalled_powermetrics_is_replaced_even_when_it_cannot_be_signalled(
    sudo_power: SudoPower, variant: str
) -> None:
    """A powermetrics that stops writing is replaced after `hung` intervals. Where sudo relays
    SIGTERM it dies of it; where the user may not signal it, `kill` fails with EPERM, the run is
    abandoned (not an error, not an exit of the sampler), and the stalled process dies of SIGPIPE
    the moment it writes again, because its output pipe was closed."""
    sudo_power.steer("--after", "stall", "--samples", "2", "--stall-seconds", "3")
    async with sampler_as(sudo_power, variant, stale=3, hung=5) as driver:
        hung = lambda: driver.named("powermetrics stopped delivering samples; restarting it")  # noqa: E731
        if variant == RELAY:
            await wait_for(lambda: len(driver.named("powermetrics exited")) >= 1, timeout=60,
                           what="the stalled run to end", on_timeout=driver.tail)
        else:
            await wait_for(lambda: driver.named("abandoned powermetrics ended"), timeout=60,
                           what="the abandoned run to die at its next write", on_timeout=driver.tail)
        await wait_for(lambda: any(e["start"] >= 2 for e in driver.named("sample")), timeout=60,
                       what="samples from the replacement run", on_timeout=driver.tail)
        still_running = driver.proc.returncode is None
        rc = await driver.stop()

    assert still_running and rc == 0 and hung()
    first_end = driver.named("powermetrics run over")[0]
    if variant == RELAY:
        assert first_end["returncode"] == -signal.SIGTERM and not first_end["abandoned"]  # relayed by sudo
        assert driver.named("powermetrics exited")[0]["returncode"] == -signal.SIGTERM
    else:
        assert first_end["abandoned"] and first_end["returncode"] is None
        (abandoning,) = driver.named(
            "powermetrics could not be ended; abandoning it (it ends at its next write or after its pinned samples)"
        )[:1]
        assert abandoning["may_signal"] is False  # the agent's SIGTERM was refused (EPERM)
        ended = driver.named("abandoned powermetrics ended")[0]
        assert ended["pid"] == first_end["pid"] and ended["returncode"] == -signal.SIGPIPE
    assert len(driver.named("driver stopped")[0]["abandoned"]) <= 1
    # A run abandoned at the stop is still asleep; it dies at its next write, within the stall.
    await wait_for(lambda: sudo_power.leftovers() == [], timeout=30, what="every stand-in to be gone")
    assert not [pid for pid in pids_in(sudo_power.pids) if alive(pid, sudo_power.options)]
