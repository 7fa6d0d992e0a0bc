"""Process records: compare-and-delete, and proof of identity that survives a wall-clock step."""

from __future__ import annotations

from metal_agent.adapters.process.records import ProcessRecord, RecordStore, same_start


def record(pid: int, create_time: float, boot_time: float = 0.0) -> ProcessRecord:
    return ProcessRecord(key="ns/a", uid="u", pid=pid, create_time=create_time, spec_hash="h", port=1,
                         host="127.0.0.1", argv_digest="d", boot_time=boot_time)


def test_remove_with_identity_spares_a_newer_process_record(tmp_path):
    """A late clean-up for an old process must not orphan the one that replaced it."""
    store = RecordStore(tmp_path)
    store.save(record(200, 2000.0))
    assert not store.remove("ns/a", pid=100, create_time=1000.0)  # the old process's exit, handled late
    assert [r.pid for r in store.load_all()] == [200]
    assert not store.remove("ns/a", pid=200, create_time=1999.0)  # same pid, another start: pid reused
    assert store.remove("ns/a", pid=200, create_time=2000.0)
    assert store.load_all() == []
    assert not store.remove("ns/a", pid=200)


def test_start_time_matches_across_a_clock_step():
    rec = record(1, create_time=1_000_000.0, boot_time=999_000.0)
    assert same_start(rec, 1_000_000.4, 999_000.0)  # psutil rounding
    # Linux: the step moves boot time and every create time with it; time since boot holds.
    assert same_start(rec, 1_000_000.0 + 3600, 999_000.0 + 3600)
    # macOS: the kernel keeps the absolute start; boot time moves.
    assert same_start(rec, 1_000_000.0, 999_000.0 - 3600)
    # Another process: neither matches.
    assert not same_start(rec, 1_000_030.0, 999_000.0)
    assert not same_start(record(1, 1_000_000.0), 1_000_000.0 + 3600, 999_000.0 + 3600)  # old record: no boot time


def test_a_pre_exec_record_finds_its_process_by_command_line(tmp_path):
    """An agent killed between exec and the full record leaves only the pre-exec record
    (pid 0); the next agent finds the process by its unique command line."""
    import subprocess
    import sys
    import time

    import psutil

    from metal_agent.adapters.process.records import argv_digest, find_unrecorded

    argv = [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path)]  # the path makes it unique
    proc = subprocess.Popen(argv)
    try:
        # Until the child has exec'd, its command line is still the parent's (fork): wait for it.
        deadline = time.monotonic() + 30
        while psutil.Process(proc.pid).cmdline() != argv:
            assert time.monotonic() < deadline, "the child never exec'd"
            time.sleep(0.001)
        pending = ProcessRecord(key="ns/a", uid="u", pid=0, create_time=0.0, spec_hash="h", port=1,
                                host="127.0.0.1", argv_digest=argv_digest(argv))
        found = find_unrecorded(pending)
        assert found is not None and found.pid == proc.pid
        assert abs(found.create_time - psutil.Process(proc.pid).create_time()) < 0.01
    finally:
        proc.kill()
        proc.wait()
    assert find_unrecorded(pending) is None  # gone: nothing to adopt, the record is dropped


def test_records_of_the_wrong_shape_are_skipped(tmp_path):
    store = RecordStore(tmp_path)
    store.save(record(200, 2000.0))
    for name, text in {"a.json": "null", "b.json": "[1, 2]", "c.json": '{"version": 1, "pid": "x"}'}.items():
        (tmp_path / name).write_text(text)
    assert [r.pid for r in store.load_all()] == [200]


def test_a_record_whose_argv_does_not_hash_to_its_digest_is_refused(tmp_path):
    """The digest is what the live process is matched against; the argv is what a restart
    runs: a record where they disagree is forged (or corrupt) and is never believed."""
    import json
    from dataclasses import asdict, replace

    from structlog.testing import capture_logs

    from metal_agent.adapters.process.records import argv_digest

    store = RecordStore(tmp_path)
    honest = replace(record(200, 2000.0), argv=("llama-server", "--port", "1"),
                     argv_digest=argv_digest(["llama-server", "--port", "1"]))
    store.save(honest)
    forged = replace(honest, key="ns/b", argv=("/bin/sh", "-c", "touch /tmp/x"))
    (tmp_path / "ns__b.json").write_text(json.dumps(asdict(forged)))
    (tmp_path / "ns__b.json").chmod(0o600)
    with capture_logs() as logs:
        assert store.load_all() == [honest]
    assert [(e["file"], e["why"]) for e in logs] == [
        (str(tmp_path / "ns__b.json"), "ns__b.json: its command line does not match its digest")]
    assert not store.remove("ns/b", pid=200)  # nor does it count as a record when deleting by identity
