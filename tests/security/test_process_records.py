"""Forged process records: a record decides what the agent signals and runs again, so only
self-consistent records in a directory only the agent's user can write are believed.

Real processes, the real ProcessManager and Supervisor: a forged record whose digest is
that of a real running process, but whose argv is a command of the attacker's, must never
run; the honest record beside it is adopted and, when its process dies, restarted with its
recorded argv (the positive control: this is the path the forged argv would take).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import aiohttp
import psutil
import pytest
from structlog.testing import capture_logs

from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.adapters.process.records import ProcessRecord, RecordStore, argv_digest
from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.core.backoff import Backoff
from tests.support.procs import process_gone
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

# Writes one line to its marker each time it starts, then idles (it serves no /health:
# the supervisor keeps it as long as it lives, and restarts it when it dies).
STARTS_AND_IDLES = "import sys, time; open(sys.argv[1], 'a').write('started\\n'); time.sleep(600)"


def _start(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, start_new_session=True)  # a group leader, as the agent starts its servers
    wait_for_exec(proc.pid, argv)
    return proc


def wait_for_exec(pid: int, argv: list[str]) -> None:
    """Until the child has exec'd its command line is the parent's (fork)."""
    import time
    deadline = time.monotonic() + 30
    while psutil.Process(pid).cmdline() != argv:
        assert time.monotonic() < deadline, "the child never exec'd"
        time.sleep(0.005)


def record_of(proc: subprocess.Popen, key: str, argv: list[str], **overrides) -> ProcessRecord:
    p = psutil.Process(proc.pid)
    fields = dict(key=key, uid="u-" + key, pid=proc.pid, create_time=p.create_time(), spec_hash="h" * 64, port=1,
                  host="127.0.0.1", argv_digest=argv_digest(p.cmdline()), argv=tuple(argv),
                  boot_time=psutil.boot_time())
    fields.update(overrides)
    return ProcessRecord(**fields)


def write_record(directory: Path, record: ProcessRecord, name: str | None = None) -> Path:
    path = directory / (name or record.key.replace("/", "__") + ".json")
    path.write_text(json.dumps(asdict(record)))
    path.chmod(0o600)
    return path


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []

    def start(argv):
        proc = _start(argv)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()
    for p in psutil.Process().children(recursive=True):  # restarts made by the supervisor
        if "started\\n" in " ".join(p.cmdline()):
            p.kill()


@pytest.fixture
async def manager_for():
    http = aiohttp.ClientSession()
    made: list[ProcessManager] = []

    def make(directory: Path, log_dir: Path) -> ProcessManager:
        manager = ProcessManager(records=RecordStore(directory), log_dir=log_dir, http=http,
                                 on_change=lambda *a: None,
                                 settings=SupervisorSettings(stop_grace=2, liveness_interval=600, readiness_interval=600,
                                                             backoff=Backoff(initial=0.1, first_immediate=True)))
        made.append(manager)
        return manager
    yield make
    for manager in made:
        await manager.shutdown(stop_processes=True)
    await http.close()


def _ignored(logs, path: Path) -> list[str]:
    return [entry["why"] for entry in logs
            if entry.get("event", "").startswith("ignoring a process record") and entry.get("file") == str(path)]


async def test_a_forged_argv_never_runs_and_the_honest_record_still_does(tmp_path, processes, manager_for):
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    control = tmp_path / "control-starts"
    try:
        # The attacker's record: pid, start time and digest of a real process (so `live_process`
        # matches it), but a command of their own as the argv a restart would run.
        decoy_argv = [sys.executable, "-c", "import time; time.sleep(600)", str(tmp_path / "decoy")]
        decoy = processes(decoy_argv)
        forged = write_record(records, record_of(decoy, "ns/forged", ["/bin/sh", "-c", f"touch {marker}"]))
        # The honest record beside it: argv is the process's own command line.
        honest_argv = [sys.executable, "-c", STARTS_AND_IDLES, str(control)]
        honest = processes(honest_argv)
        write_record(records, record_of(honest, "ns/honest", honest_argv))
        await wait_for(lambda: control.exists() and control.read_text().count("started") == 1, timeout=30,
                       what="the honest process up")

        manager = manager_for(records, tmp_path / "logs")
        with capture_logs() as logs:
            manager.load_adoptable()
        assert set(manager.adoptable) == {"ns/honest"}
        assert _ignored(logs, forged) == ["ns__forged.json: its command line does not match its digest"]
        assert manager.supervise_recorded() == ["ns/honest"]

        # Both processes die: a restart of an adopted record runs its recorded argv.
        honest.kill()
        decoy.kill()
        await wait_for(lambda: control.read_text().count("started") == 2, timeout=60,
                       what="the honest record's argv restarted by the supervisor")
        assert set(manager.supervisors) == {"ns/honest"}
        assert not marker.exists()  # the forged argv never ran
        assert forged.exists()  # left for inspection, not deleted
    finally:
        if marker.exists():
            marker.unlink()


async def test_a_forged_record_is_never_signalled_either(tmp_path, processes, manager_for):
    """Unwanted records are stopped at start-up (their process group signalled): a forged one
    must not get the pid it names signalled."""
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    victim_argv = [sys.executable, "-c", "import time; time.sleep(600)", str(tmp_path / "victim")]
    victim = processes(victim_argv)
    write_record(records, record_of(victim, "ns/victim", ["/bin/true"]))
    manager = manager_for(records, tmp_path / "logs")
    manager.load_adoptable()
    await manager.stop_unwanted_adoptable(lambda key: False)
    assert manager.adoptable == {}
    assert psutil.Process(victim.pid).status() != psutil.STATUS_ZOMBIE and not process_gone(victim.pid)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
async def test_a_directory_others_can_write_is_ignored_whole(tmp_path, processes, manager_for, mode):
    records = tmp_path / "records"
    records.mkdir()
    argv = [sys.executable, "-c", "import time; time.sleep(600)", str(tmp_path / "p")]
    proc = processes(argv)
    write_record(records, record_of(proc, "ns/honest", argv))
    records.chmod(mode)
    manager = manager_for(records, tmp_path / "logs")
    with capture_logs() as logs:
        manager.load_adoptable()
    assert manager.adoptable == {}
    assert [e["why"] for e in logs if e.get("event", "").startswith("ignoring every process record")] == [
        f"the record directory {records} is writable by group or others (mode {mode:04o})"]
    assert (records / "ns__honest.json").exists() and not process_gone(proc.pid)  # nothing deleted, nothing signalled
    # Nor does the agent write a record there: a spawn fails with the reason instead.
    with pytest.raises(OSError, match="writable by group or others"):
        RecordStore(records).save(record_of(proc, "ns/other", argv))
    assert sorted(p.name for p in records.iterdir()) == ["ns__honest.json"]


async def test_symlinked_and_foreign_record_files_are_ignored(tmp_path, processes, manager_for):
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = [sys.executable, "-c", "import time; time.sleep(600)", str(tmp_path / "p")]
    proc = processes(argv)
    target = write_record(elsewhere, record_of(proc, "ns/linked", argv))
    (records / "ns__linked.json").symlink_to(target)
    loose = write_record(records, record_of(proc, "ns/loose", argv))
    loose.chmod(0o666)
    misnamed = write_record(records, record_of(proc, "ns/right", argv), name="ns__wrong.json")
    traversal = write_record(records, record_of(proc, "../../x", argv), name="..__..__x.json")
    foreign_uid = None
    if os.geteuid() == 0:  # a file of another user in our directory
        foreign_uid = write_record(records, record_of(proc, "ns/foreign", argv))
        os.chown(foreign_uid, 65534, 65534)
    manager = manager_for(records, tmp_path / "logs")
    with capture_logs() as logs:
        manager.load_adoptable()
    assert manager.adoptable == {}
    assert _ignored(logs, records / "ns__linked.json") == ["ns__linked.json is a symbolic link"]
    assert _ignored(logs, loose) == ["ns__loose.json is writable by group or others (mode 0666)"]
    assert _ignored(logs, misnamed) == ["ns__wrong.json: its key 'ns/right' is not the namespace/name its file is named for"]
    assert _ignored(logs, traversal) == ["..__..__x.json: its key '../../x' is not the namespace/name its file is named for"]
    if foreign_uid is not None:
        assert _ignored(logs, foreign_uid) == [
            f"ns__foreign.json belongs to uid 65534, not to the agent's user (uid {os.geteuid()})"]
    assert target.exists() and not process_gone(proc.pid)
    assert not list((tmp_path / "logs").glob("*")) if (tmp_path / "logs").exists() else True


async def test_a_process_of_another_user_is_never_adopted(tmp_path, manager_for):
    """A consistent record of a process another user runs: the agent did not start it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    argv = ["/bin/sh", "-c", "sleep 600; :", f"nobody-{uuid.uuid4().hex}"]
    proc = subprocess.Popen(argv, user=65534, group=65534, cwd="/")
    try:
        wait_for_exec(proc.pid, argv)
        write_record(records, record_of(proc, "ns/nobody", argv))
        manager = manager_for(records, tmp_path / "logs")
        manager.load_adoptable()
        assert manager.adoptable == {}
        assert not process_gone(proc.pid)
    finally:
        proc.kill()
        proc.wait()
