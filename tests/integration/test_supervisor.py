"""The supervisor on real processes: start/stop races, startup timeout, a hung server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import psutil
import pytest

from metal_agent.adapters.process.logfile import ServiceLog
from metal_agent.adapters.process.records import RecordStore
from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.adapters.process.supervisor import LaunchPlan, Supervisor
from metal_agent.core.backoff import Backoff
from metal_agent.core.process import ExitReason, State
from tests.support.procs import process_gone
from tests.support.slowness import scaled
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.states: list[State] = []

    def __call__(self, snap, event) -> None:
        self.states.append(snap.state)
        if event is not None:
            self.events.append(event.reason)


@pytest.fixture
async def make(tmp_path):
    http = aiohttp.ClientSession()
    supervisors: list[Supervisor] = []

    def factory(build_argv, **settings) -> tuple[Supervisor, Recorder]:
        recorder = Recorder()
        sup = Supervisor(
            LaunchPlan(key="ns/svc", uid="u", spec_hash="h" * 64, host="127.0.0.1", build_argv=build_argv),
            log_file=ServiceLog(tmp_path / "svc.log"), records=RecordStore(tmp_path / "records"), http=http,
            on_change=recorder, settings=SupervisorSettings(**settings),
        )
        supervisors.append(sup)
        return sup, recorder

    yield factory
    for sup in supervisors:
        await sup.stop()
    await http.close()


def llama(binary, model):
    return lambda port: [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                         "--ctx-size", "256", "--threads", "1"]


async def test_stop_right_after_start_leaves_nothing_running(make, llama_server_bin, tiny_model, tmp_path):
    for _ in range(5):  # stop lands at different points of the spawn
        sup, _ = make(llama(llama_server_bin, tiny_model))
        sup.start()
        await asyncio.sleep(0)
        await sup.stop()
        assert sup.snapshot.state is State.STOPPED
        assert RecordStore(tmp_path / "records").load_all() == []
    leftovers = [p for p in psutil.Process().children(recursive=True) if "llama-server" in " ".join(p.cmdline())]
    assert all(process_gone(p.pid) for p in leftovers)


async def test_startup_timeout_stops_the_process_and_backs_off(make):
    # A real process that never serves /health stands in for a model that loads forever.
    sup, rec = make(lambda port: [sys.executable, "-c", "import time; time.sleep(600)"],
                    startup_timeout=0.5, backoff=Backoff(initial=30, first_immediate=False))
    sup.start()
    await wait_for(lambda: sup.snapshot.state is State.BACKOFF, timeout=10, what="back-off after timeout")
    assert sup.snapshot.last_exit.reason is ExitReason.STARTUP_TIMEOUT
    assert "StartupTimeout" in rec.events


async def test_hung_server_is_detected_and_restarted(make, llama_server_bin, tiny_model):
    sup, rec = make(llama(llama_server_bin, tiny_model), liveness_interval=0.2, liveness_timeout=scaled(1.0),
                    liveness_failures=2)
    sup.start()
    await wait_for(lambda: sup.snapshot.state is State.READY, timeout=30, what="ready")
    pid = sup.snapshot.pid
    os.kill(pid, signal.SIGSTOP)  # alive but not answering: only liveness probes can tell
    try:
        await wait_for(lambda: sup.snapshot.state is State.READY and sup.snapshot.pid != pid, timeout=30,
                       what="restart after liveness failures")
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGCONT)
    assert {"Unhealthy", "LivenessFailed", "Restarting"} <= set(rec.events)
    assert sup.snapshot.last_exit.reason is ExitReason.UNHEALTHY
    assert process_gone(pid)


async def test_a_child_whose_record_cannot_be_saved_is_stopped(tmp_path):
    """No process may run that no later agent could prove it started (and so adopt or stop):
    with an unwritable state directory nothing is started, and the reason says so."""
    (tmp_path / "records").write_text("a file where the record directory should be")
    rec = Recorder()
    http = aiohttp.ClientSession()

    marker = f"import time; time.sleep(600)  # {tmp_path.name}"

    def argv(port):
        return [sys.executable, "-c", marker]

    sup = Supervisor(LaunchPlan(key="ns/svc", uid="u", spec_hash="h" * 64, host="127.0.0.1", build_argv=argv),
                     log_file=ServiceLog(tmp_path / "svc.log"), records=RecordStore(tmp_path / "records"), http=http,
                     on_change=rec,
                     settings=SupervisorSettings(backoff=Backoff(initial=30, first_immediate=False)))
    try:
        sup.start()
        await wait_for(lambda: sup.snapshot.state is State.BACKOFF, timeout=10, what="spawn reported as failed")
        assert sup.snapshot.last_exit.reason is ExitReason.SPAWN_FAILED
        assert "process record" in sup.snapshot.last_exit.describe()
        children = [p for p in psutil.Process().children(recursive=True) if marker in " ".join(p.cmdline())]
        assert not [p for p in children if not process_gone(p.pid)]  # nothing was started
    finally:
        await sup.stop()
        await http.close()


async def test_a_child_whose_pid_cannot_be_recorded_is_stopped_at_once(tmp_path):
    """The record naming the pid fails after the exec (a full disk, say): the process that is
    running must be stopped at once, before any later agent could meet it unprovable."""
    spawned: list[int] = []

    class FullAfterExec(RecordStore):
        def save(self, record):
            if record.pid:
                spawned.append(record.pid)
                raise OSError(28, "No space left on device")
            super().save(record)

    rec = Recorder()
    http = aiohttp.ClientSession()
    sup = Supervisor(LaunchPlan(key="ns/svc", uid="u", spec_hash="h" * 64, host="127.0.0.1",
                                build_argv=lambda port: [sys.executable, "-c", "import time; time.sleep(600)"]),
                     log_file=ServiceLog(tmp_path / "svc.log"), records=FullAfterExec(tmp_path / "records"), http=http,
                     on_change=rec, settings=SupervisorSettings(backoff=Backoff(initial=30, first_immediate=False)))
    try:
        sup.start()
        await wait_for(lambda: sup.snapshot.state is State.BACKOFF, timeout=10, what="spawn reported as failed")
        assert sup.snapshot.last_exit.reason is ExitReason.SPAWN_FAILED
        assert "No space left on device" in sup.snapshot.last_exit.describe()
        assert len(spawned) == 1  # the exec happened: there was a process to stop
        assert process_gone(spawned[0])  # stopped before the failure was reported, not at stop()
        assert not RecordStore(tmp_path / "records").load_all()  # and no pid-less record is left
    finally:
        await sup.stop()
        await http.close()


async def test_a_bug_in_supervision_is_reported_not_silent(tmp_path):
    """An unexpected error ends the supervision task: it must be visible (state, Event, the
    `failed` mark the reconciler acts on), never a service that only looks managed. The bug
    strikes after the exec (in the record naming the pid), so a process is running: stop()
    must still end it."""
    class BrokenStore(RecordStore):
        def save(self, record):
            if record.pid:  # the record written once the process runs
                raise RuntimeError("bug in the record store")
            super().save(record)

    marker = f"import time; time.sleep(600)  # {tmp_path.name}"
    rec = Recorder()
    http = aiohttp.ClientSession()
    sup = Supervisor(LaunchPlan(key="ns/svc", uid="u", spec_hash="h" * 64, host="127.0.0.1",
                                build_argv=lambda port: [sys.executable, "-c", marker]),
                     log_file=ServiceLog(tmp_path / "svc.log"), records=BrokenStore(tmp_path / "records"), http=http,
                     on_change=rec)
    try:
        sup.start()
        await wait_for(lambda: sup.failed is not None, timeout=10, what="supervision failure noticed")
        assert "SupervisorFailed" in rec.events and sup.snapshot.state is State.STOPPED
        children = [p for p in psutil.Process().children(recursive=True) if marker in " ".join(p.cmdline())]
        assert len(children) == 1, children  # the bug struck with a process running
    finally:
        await sup.stop()
        await http.close()
    await wait_for(lambda: process_gone(children[0].pid), timeout=10, what="stop() to end the process it had spawned")


async def test_a_server_that_stops_answering_leaves_service_at_once_and_returns_without_a_restart(
        make, llama_server_bin, tiny_model):
    """Readiness reacts between liveness probes: UNHEALTHY (out of its slice) within a quick
    probe or two; answering again makes it READY again; only liveness probes restart it."""
    sup, rec = make(llama(llama_server_bin, tiny_model), liveness_interval=60, liveness_failures=1,
                    readiness_interval=0.1, readiness_timeout=scaled(1.0))
    sup.start()
    await wait_for(lambda: sup.snapshot.state is State.READY, timeout=30, what="ready")
    pid = sup.snapshot.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        await wait_for(lambda: sup.snapshot.state is State.UNHEALTHY, timeout=30,
                       what="a quick probe to take it out of service (the liveness probe is 60 s away)")
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_for(lambda: sup.snapshot.state is State.READY, timeout=30, what="back in service once it answers")
    assert sup.snapshot.pid == pid and not process_gone(pid)
    assert rec.events.count("Unhealthy") == 1 and "Recovered" in rec.events
    assert "LivenessFailed" not in rec.events and "Restarting" not in rec.events
