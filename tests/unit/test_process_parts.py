"""Process records, exit watching, log files and the work queue, on real processes and files."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import psutil
import pytest

from metal_agent.adapters.process.exitwatch import wait_exit
from metal_agent.adapters.process.logfile import ServiceLog
from metal_agent.adapters.process.records import ProcessRecord, RecordStore, argv_digest, live_process
from metal_agent.controller.workqueue import WorkQueue
from tests.support.slowness import scaled

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(SLEEPER)
    yield proc
    proc.kill()
    proc.wait()


def record_for(proc, **overrides) -> ProcessRecord:
    p = psutil.Process(proc.pid)
    fields = dict(key="ns/a", uid="u1", pid=proc.pid, create_time=p.create_time(), spec_hash="h",
                  port=8081, host="127.0.0.1", argv_digest=argv_digest(p.cmdline()))
    fields.update(overrides)
    return ProcessRecord(**fields)


def test_live_process_requires_pid_create_time_and_cmdline(sleeper):
    assert live_process(record_for(sleeper)) is not None
    assert live_process(record_for(sleeper, create_time=1.0)) is None  # pid reused by another process
    assert live_process(record_for(sleeper, argv_digest=argv_digest(["llama-server"]))) is None


def test_dead_process_is_not_live(sleeper):
    record = record_for(sleeper)
    sleeper.kill()
    sleeper.wait()
    assert live_process(record) is None


def test_record_store_round_trip_and_corrupt_files(tmp_path, sleeper):
    store = RecordStore(tmp_path)
    record = record_for(sleeper)
    store.save(record)
    (tmp_path / "broken.json").write_text("{not json")
    assert store.load_all() == [record]
    store.remove("ns/a")
    assert store.load_all() == []


async def test_wait_exit_sees_a_non_child_exit_at_once(tmp_path):
    # A grandchild (re-parented away from us) stands in for an adopted llama-server.
    launcher = subprocess.run(
        [sys.executable, "-c", "import subprocess,sys; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"],
        capture_output=True, text=True, check=True,
    )
    pid = int(launcher.stdout)
    waiter = asyncio.create_task(wait_exit(pid))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    killed = time.monotonic()
    psutil.Process(pid).kill()
    await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - killed < scaled(1.0)


def test_service_log_rotates_by_copy_truncate_and_reads_new_output(tmp_path):
    log = ServiceLog(tmp_path / "svc.log", max_bytes=100, backups=2)
    fd = log.open_for_child()
    try:
        import os
        os.write(fd, b"old line\n" * 20)
        mark = log.mark()
        os.write(fd, b"fresh\n")
        assert log.read_since(mark) == "fresh\n"
        assert log.rotate_if_needed()
        os.write(fd, b"after rotation\n")  # the child's O_APPEND fd keeps working
    finally:
        os.close(fd)
    assert (tmp_path / "svc.log").read_text() == "after rotation\n"
    assert (tmp_path / "svc.log.1").read_text().endswith("fresh\n")
    assert log.tail(1) == ["after rotation"]


async def test_workqueue_deduplicates_and_runs_one_worker_per_key():
    running: dict[str, int] = {}
    calls: list[str] = []
    gate = asyncio.Event()

    async def handler(key: str):
        running[key] = running.get(key, 0) + 1
        assert running[key] == 1, "two workers on one key"
        calls.append(key)
        if key == "slow" and calls.count("slow") == 1:
            await gate.wait()
        running[key] -= 1
        return None

    queue = WorkQueue(concurrency=4)
    queue.start(handler)
    try:
        queue.add("slow")
        for _ in range(5):
            queue.add("fast")  # collapses into one reconcile
        while calls.count("fast") < 1:
            await asyncio.sleep(0.01)
        queue.add("slow")  # while slow is running: runs once more afterwards
        queue.add("slow")
        assert calls.count("slow") == 1
        gate.set()
        await asyncio.wait_for(queue.wait_idle(), 5)
        assert calls.count("fast") == 1
        assert calls.count("slow") == 2
    finally:
        await queue.stop()


async def test_workqueue_retries_a_failing_key_later():
    attempts = []

    async def handler(key: str):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("transient")
        return None

    queue = WorkQueue(concurrency=1, retry_initial=0.05)
    queue.start(handler)
    try:
        queue.add("k")
        deadline = time.monotonic() + 5
        while len(attempts) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(attempts) == 2
    finally:
        await queue.stop()


def test_llama_server_configuration_variables_never_reach_the_child():
    from metal_agent.adapters.process.supervisor import child_environment

    env = child_environment({"PATH": "/usr/bin", "LLAMA_ARG_PORT": "1", "LLAMA_ARG_HOST": "0.0.0.0",
                             "LLAMA_API_KEY": "secret", "HOME": "/Users/me"})
    assert env == {"PATH": "/usr/bin", "HOME": "/Users/me"}
