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
