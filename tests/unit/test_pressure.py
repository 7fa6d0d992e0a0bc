"""Memory pressure decisions: levels with hysteresis, victim choice, the blocking state machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from metal_agent.core.api import Priority
from metal_agent.core.pressure import (
    SKIP_ALL_PROTECTED,
    SKIP_EVICTION_IN_PROGRESS,
    SKIP_FOREIGN_PRESSURE,
    SKIP_LAST_RUNNING,
    SKIP_NOTHING_RUNNING,
    Evict,
    EvictionSkipped,
    Level,
    LevelChanged,
    MemoryReading,
    PressureState,
    ServiceMemory,
    Skip,
    Thresholds,
    Unblock,
    Victim,
    Attribution,
    attribute,
    choose_victim,
    classify,
    parse_vm_stat,
    step,
)

N, W, C = Level.NORMAL, Level.WARNING, Level.CRITICAL


@pytest.mark.parametrize("previous,available_pct,expected", [
    (N, 50, N), (N, 15, N), (N, 14.9, W), (N, 8, W), (N, 7.9, C), (N, 0, C),
    (W, 14, W), (W, 17.9, W), (W, 18, N),        # Warning ends only at ≥ 18 %
    (W, 7, C),
    (C, 9, C), (C, 10.9, C), (C, 11, W), (C, 17, W), (C, 18, N), (C, 60, N),  # Critical ends at ≥ 11 %
])
def test_levels_rise_at_once_and_fall_with_a_margin(previous, available_pct, expected):
    assert classify(previous, int(available_pct * 1000), 100_000) is expected


def test_a_reading_without_a_total_keeps_the_level():
    assert classify(W, 0, 0) is W


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError):
        Thresholds(warning=0.05, critical=0.08)


def svc(key, priority=Priority.NORMAL, rss=1, started=0.0, protected=False) -> ServiceMemory:
    return ServiceMemory(key, priority, rss, started, protected)


@pytest.mark.parametrize("services,evicting,expected", [
    ([], (), Skip(SKIP_NOTHING_RUNNING)),
    ([svc("a")], (), Skip(SKIP_LAST_RUNNING)),
    ([svc("a", protected=True), svc("b", protected=True)], (), Skip(SKIP_ALL_PROTECTED)),
    ([svc("a"), svc("b")], {"b"}, Skip(SKIP_EVICTION_IN_PROGRESS)),
    # priority first: batch < low < normal < high < critical
    ([svc("c", Priority.CRITICAL), svc("h", Priority.HIGH), svc("b", Priority.BATCH, rss=1)], (), Victim("b")),
    ([svc("n", Priority.NORMAL, rss=99), svc("l", Priority.LOW, rss=1)], (), Victim("l")),
    ([svc("h", Priority.HIGH), svc("c", Priority.CRITICAL)], (), Victim("h")),
    # then the largest RSS, then the newest
    ([svc("small", rss=1), svc("big", rss=9)], (), Victim("big")),
    ([svc("old", rss=5, started=1), svc("new", rss=5, started=2)], (), Victim("new")),
    # protection is absolute, but the last *unprotected* one may go while others run
    ([svc("p", Priority.BATCH, protected=True), svc("x", Priority.CRITICAL)], (), Victim("x")),
])
def test_choose_victim(services, evicting, expected):
    assert choose_victim(services, evicting) == expected


def reading(available_pct: float) -> MemoryReading:
    return MemoryReading(total_bytes=100_000, available_bytes=int(available_pct * 1000))


def test_state_machine_evicts_one_per_tick_blocks_and_unblocks_at_normal():
    # Our services hold most of the memory in use (60 of 95 units, then 50 of 94): the pressure is ours.
    a = svc("ns/a", Priority.LOW, rss=10_000)
    b = svc("ns/b", Priority.NORMAL, rss=20_000)
    c = svc("ns/c", Priority.HIGH, rss=30_000)
    state = PressureState()

    state, actions = step(state, reading(12), [a, b, c])
    assert actions == (LevelChanged(N, W),) and state.blocked == frozenset()

    state, actions = step(state, reading(5), [a, b, c])
    assert actions == (LevelChanged(W, C), Evict("ns/a")) and state.blocked == {"ns/a"}

    # a is still shutting down: its memory is not back yet, so nothing else goes
    state, actions = step(state, reading(5), [a, b, c])
    assert actions == (EvictionSkipped(SKIP_EVICTION_IN_PROGRESS),)

    state, actions = step(state, reading(6), [b, c])
    assert actions == (Evict("ns/b"),) and state.blocked == {"ns/a", "ns/b"}

    state, actions = step(state, reading(7), [c])
    assert actions == (EvictionSkipped(SKIP_LAST_RUNNING),)

    # recovering to Warning keeps them blocked; Normal releases all of them at once
    state, actions = step(state, reading(12), [c])
    assert actions == (LevelChanged(C, W),) and state.blocked == {"ns/a", "ns/b"}
    state, actions = step(state, reading(16), [c])
    assert actions == () and state.level is W
    state, actions = step(state, reading(30), [c])
    assert actions == (LevelChanged(W, N), Unblock(frozenset({"ns/a", "ns/b"})))
    assert state == PressureState(N, frozenset())


@pytest.mark.parametrize("own,available,share", [
    (30, 40, 0.5),      # 30 of the 60 in use
    (0, 40, 0.0),
    (90, 40, 1.0),      # RSS counting pages the kernel also calls available: capped
    (5, 100, 1.0),      # nothing in use but ours
    (0, 100, 0.0),
    (10, 120, 1.0),     # available above total (a bad reading): nothing in use
])
def test_attribution_is_our_share_of_the_memory_in_use(own, available, share):
    got = attribute(MemoryReading(total_bytes=100, available_bytes=available), [svc("a", rss=own)])
    assert got.share == share and got.own_bytes == own


def test_attribution_sums_our_services_and_leaves_the_rest_to_others():
    got = attribute(MemoryReading(100, 10), [svc("a", rss=20), svc("b", rss=25), svc("c", rss=-1)])
    assert got == Attribution(own_bytes=45, in_use_bytes=90) and got.other_bytes == 45 and got.share == 0.5


GIB = 1 << 30


def test_critical_pressure_from_other_processes_evicts_nothing_and_says_why():
    """LLMKube's guard: a build job or a browser filling the Mac must not cost a production model."""
    a, b = svc("ns/a", Priority.LOW, rss=3 * GIB), svc("ns/b", Priority.HIGH, rss=5 * GIB)
    critical = MemoryReading(total_bytes=64 * GIB, available_bytes=2 * GIB)  # 62 GiB in use, 8 ours

    state, actions = step(PressureState(), critical, [a, b])
    assert actions == (LevelChanged(N, C), EvictionSkipped(SKIP_FOREIGN_PRESSURE, (
        "pressure comes from other processes: this agent's services hold 8.0 GiB of the 62.0 GiB in use (13%), "
        "other processes 54.0 GiB; eviction needs more than 50%")))
    assert state.blocked == frozenset()

    # The same Mac with our services holding most of it: the pressure is ours, one goes.
    big = svc("ns/b", Priority.HIGH, rss=40 * GIB)
    state, actions = step(state, critical, [a, big])
    assert actions == (Evict("ns/a"),) and state.blocked == {"ns/a"}


@pytest.mark.parametrize("own_gib,threshold,evicts", [
    (31, 0.5, False),   # exactly half of the 62 GiB in use is not more than half
    (32, 0.5, True),
    (20, 0.3, True),
    (18, 0.3, False),
    (0, 0.0, True),     # 0 turns the guard off: evict whatever the cause
])
def test_the_guard_needs_more_than_the_configured_share(own_gib, threshold, evicts):
    services = [svc("ns/a", Priority.LOW, rss=own_gib * GIB), svc("ns/b", Priority.HIGH, rss=0)]
    _, actions = step(PressureState(C), MemoryReading(64 * GIB, 2 * GIB), services, min_own_share=threshold)
    assert isinstance(actions[0], Evict if evicts else EvictionSkipped)


def test_other_refusals_come_before_the_guard_and_warning_or_disabled_never_ask_it():
    critical = MemoryReading(64 * GIB, 2 * GIB)
    lone = [svc("ns/a", rss=1)]
    assert step(PressureState(C), critical, lone)[1] == (EvictionSkipped(SKIP_LAST_RUNNING),)
    assert step(PressureState(C, frozenset({"ns/a"})), critical, [*lone, svc("ns/b")])[1] == (
        EvictionSkipped(SKIP_EVICTION_IN_PROGRESS),)
    two = [svc("ns/a", rss=1), svc("ns/b", rss=1)]
    assert step(PressureState(C), critical, two, evict=False)[1] == ()
    assert step(PressureState(W), MemoryReading(64 * GIB, 8 * GIB), two)[1] == ()


def test_forgetting_a_deleted_service_drops_its_block():
    state = PressureState(C, frozenset({"ns/a", "ns/b"}))
    assert state.forget("ns/a").blocked == {"ns/b"} and state.forget("ns/a").level is C


# A real capture (tests/fixtures/darwin_memory/, which names its source): an Apple Silicon Mac,
# 16 KiB pages. The agent reads these numbers with host_statistics64 now; vm_stat's text is how
# they are published, so the parser stays for the tests.
VM_STAT_CAPTURE = "".join(
    line
    for line in (Path(__file__).resolve().parents[1] / "fixtures" / "darwin_memory" / "vm_stat-apple-silicon-16gb-swapping.txt")
    .read_text()
    .splitlines(keepends=True)
    if not line.startswith("#")
)


def test_vm_stat_parse_gives_wired_bytes():
    parsed = parse_vm_stat(VM_STAT_CAPTURE)
    assert parsed.page_size == 16384
    assert parsed.wired_bytes == 198107 * 16384
    assert parsed.pages["Translation faults"] == 6085905557  # quoted label, beyond 32 bits
    assert parsed.pages["Pages free"] == 4229
    assert len(parsed.pages) == 22


@pytest.mark.parametrize("text", ["", "garbage\n", "Mach Virtual Memory Statistics: (page size of 4096 bytes)\n"])
def test_vm_stat_parse_rejects_unusable_output(text):
    assert parse_vm_stat(text) is None


def test_vm_stat_without_wired_line_has_no_wired_figure():
    assert parse_vm_stat("Mach Virtual Memory Statistics: (page size of 4096 bytes)\nPages free: 10.\n").wired_bytes is None
