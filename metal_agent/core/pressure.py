"""Memory pressure decisions: level, eviction victim, respawn blocking (pure).

Admission keeps what the agent starts inside a budget, but the rest of the
Mac is not ours: a user opening a browser with 200 tabs can push the machine
into swap with our models loaded. The watchdog then frees memory the only
way it can, by stopping one of our services, and keeps it stopped until the
pressure is gone. Everything it decides is here, as a state machine driven
by readings, so the adapter only measures and executes.

The level, on macOS, is the kernel's own: ``kern.memorystatus_vm_pressure_level``
(1 normal, 2 warning, 4 critical: the dispatch values xnu's
``convert_internal_pressure_level_to_dispatch_level`` returns, and what
Activity Monitor colours its Memory Pressure graph by). A share of free
pages is a poor proxy there: macOS compresses before it swaps, so a healthy
Mac can show little "available" memory, and one that is already swapping
can still show a fair share of it. The kernel's level comes with its own
hysteresis, and is used as is.

Where there is no kernel level (Linux, or a value this code does not know),
the level comes from the share of RAM available:
* Normal:   ≥ 15 %
* Warning:  < 15 % — reported (condition, Event), nothing stopped
* Critical: < 8 %  — one service evicted per tick

Those levels rise at once but fall only when the share clears the threshold
by a margin (3 points by default: Critical ends at ≥ 11 %, Warning at ≥ 18 %).
Without it, stopping a model would drop pressure just below the line, the
evicted service would resume, and the Mac would flap between the two.

Evicted services stay blocked until the level is back to Normal, then all
of them are unblocked together and resume on their own. (LLMKube's agent
never returned to Normal, so evicted services stayed down until restart.)

The byte counts on macOS come from one ``host_statistics64(HOST_VM_INFO64)``
reading (:class:`VmStatistics64`, decoded by :func:`memory_from_vm_statistics`):
available = free + inactive + purgeable pages. The kernel's ``free_count``
already includes the speculative pages (``vm_stat`` prints
``free_count - speculative_count`` as "Pages free"), so this is LLMKube's
free + inactive + speculative + purgeable of ``vm_stat`` terms (their issue
578), and psutil's ``available`` (free_count + inactive_count) plus the
purgeable pages. Admission and the watchdog read the same numbers.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Mapping, Sequence, Union

from metal_agent.core.api import Priority


class Level(IntEnum):
    """Also the value of the `memory_pressure_level` gauge."""

    NORMAL = 0
    WARNING = 1
    CRITICAL = 2

    @property
    def label(self) -> str:
        """As in the MemoryPressure condition's reason."""
        return self.name.capitalize()


@dataclass(frozen=True, slots=True)
class Thresholds:
    warning: float = 0.15
    critical: float = 0.08
    recover_margin: float = 0.03

    def __post_init__(self) -> None:
        if not 0 < self.critical < self.warning < 1 or self.recover_margin < 0:
            raise ValueError("need 0 < critical < warning < 1 and a non-negative recover_margin")


@dataclass(frozen=True, slots=True)
class MemoryReading:
    total_bytes: int
    available_bytes: int
    wired_bytes: int | None = None  # macOS only; informational
    kernel_level: Level | None = None  # macOS: the kernel's own pressure level, which then decides


# kern.memorystatus_vm_pressure_level returns NOTE_MEMORYSTATUS_PRESSURE_*
# (xnu bsd/sys/event_private.h), not xnu's internal 0..4 enumeration.
KERNEL_PRESSURE_LEVELS: Mapping[int, Level] = {1: Level.NORMAL, 2: Level.WARNING, 4: Level.CRITICAL}


def kernel_pressure_level(raw: int | None) -> Level | None:
    """The level for a ``kern.memorystatus_vm_pressure_level`` value; None if absent or unknown."""
    return None if raw is None else KERNEL_PRESSURE_LEVELS.get(raw)


def _level_below(share: float, warning: float, critical: float) -> Level:
    if share < critical:
        return Level.CRITICAL
    if share < warning:
        return Level.WARNING
    return Level.NORMAL


def classify(previous: Level, available_bytes: int, total_bytes: int, thresholds: Thresholds = Thresholds()) -> Level:
    """The level for a reading, given the previous level (for hysteresis)."""
    if total_bytes <= 0:
        return previous
    share = max(0, available_bytes) / total_bytes
    entered = _level_below(share, thresholds.warning, thresholds.critical)
    if entered >= previous:
        return entered
    m = thresholds.recover_margin
    still = _level_below(share, thresholds.warning + m, thresholds.critical + m)
    return max(entered, min(previous, still))


def level_for(previous: Level, reading: MemoryReading, thresholds: Thresholds = Thresholds()) -> Level:
    """The level for a reading: the kernel's when it gave one, else from the available share."""
    if reading.kernel_level is not None:
        return reading.kernel_level
    return classify(previous, reading.available_bytes, reading.total_bytes, thresholds)


# -- eviction ---------------------------------------------------------------

PRIORITY_RANK: dict[Priority, int] = {
    Priority.BATCH: 0, Priority.LOW: 1, Priority.NORMAL: 2, Priority.HIGH: 3, Priority.CRITICAL: 4,
}

# Reasons an eviction was skipped: the `reason` label of evictions_skipped_total.
SKIP_NOTHING_RUNNING = "NothingRunning"
SKIP_LAST_RUNNING = "LastRunningService"
SKIP_ALL_PROTECTED = "AllProtected"
SKIP_EVICTION_IN_PROGRESS = "EvictionInProgress"


@dataclass(frozen=True, slots=True)
class ServiceMemory:
    """A running service as the watchdog sees it."""

    key: str
    priority: Priority = Priority.NORMAL
    rss_bytes: int = 0
    started_at: float = 0.0  # any monotonic-ish clock; only the order matters
    eviction_protection: bool = False


@dataclass(frozen=True, slots=True)
class Victim:
    key: str


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str


def choose_victim(services: Sequence[ServiceMemory], evicting: Iterable[str] = ()) -> Victim | Skip:
    """The one service to evict now: lowest priority, then largest RSS, then newest.

    Never the last running service (stopping it leaves the agent useless and
    the pressure is then someone else's), never one with evictionProtection.
    While an evicted service is still listed as running its memory has not
    been returned yet, so nothing more is evicted until it is gone.
    """
    evicting = set(evicting)
    if any(s.key in evicting for s in services):
        return Skip(SKIP_EVICTION_IN_PROGRESS)
    if not services:
        return Skip(SKIP_NOTHING_RUNNING)
    if len(services) == 1:
        return Skip(SKIP_LAST_RUNNING)
    candidates = [s for s in services if not s.eviction_protection]
    if not candidates:
        return Skip(SKIP_ALL_PROTECTED)
    victim = min(candidates, key=lambda s: (PRIORITY_RANK[s.priority], -s.rss_bytes, -s.started_at, s.key))
    return Victim(victim.key)


# -- state machine ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelChanged:
    old: Level
    new: Level


@dataclass(frozen=True, slots=True)
class Evict:
    key: str


@dataclass(frozen=True, slots=True)
class EvictionSkipped:
    reason: str


@dataclass(frozen=True, slots=True)
class Unblock:
    keys: frozenset[str]


Action = Union[LevelChanged, Evict, EvictionSkipped, Unblock]


@dataclass(frozen=True, slots=True)
class PressureState:
    level: Level = Level.NORMAL
    blocked: frozenset[str] = frozenset()  # evicted; must not respawn until Normal

    def forget(self, key: str) -> PressureState:
        """A deleted service is no longer blocked (a re-created one starts fresh)."""
        return PressureState(self.level, self.blocked - {key})


def step(state: PressureState, reading: MemoryReading, services: Sequence[ServiceMemory],
         thresholds: Thresholds = Thresholds(), *, evict: bool = True) -> tuple[PressureState, tuple[Action, ...]]:
    """Advance one tick. `services` are the ones running now (with a live process).

    With `evict` False (the agent's default; eviction is opt-in) levels are
    still tracked and reported, but nothing is stopped."""
    level = level_for(state.level, reading, thresholds)
    actions: list[Action] = []
    if level != state.level:
        actions.append(LevelChanged(state.level, level))
    blocked = state.blocked
    if level is Level.NORMAL and blocked:
        actions.append(Unblock(blocked))
        blocked = frozenset()
    elif level is Level.CRITICAL and evict:
        choice = choose_victim(services, evicting=blocked)
        if isinstance(choice, Victim):
            actions.append(Evict(choice.key))
            blocked = blocked | {choice.key}
        else:
            actions.append(EvictionSkipped(choice.reason))
    return PressureState(level, blocked), tuple(actions)


# -- macOS host_statistics64 ----------------------------------------------------

_natural_t = ctypes.c_uint32


class VmStatistics64(ctypes.Structure):
    """``struct vm_statistics64`` (``vm_statistics64_data_t``), xnu ``osfmk/mach/vm_statistics.h``.

    Field for field, in order: ``natural_t`` is 32 bits, the counters are
    ``uint64_t``, and the struct is ``__attribute__((aligned(8)))``, which on
    the 64-bit ABIs (arm64, x86_64) is what natural alignment gives: 152 bytes,
    ``HOST_VM_INFO64_COUNT`` = 152 / sizeof(integer_t) = 38. Counts are pages.
    """

    _fields_ = [
        ("free_count", _natural_t),  # includes speculative_count
        ("active_count", _natural_t),
        ("inactive_count", _natural_t),
        ("wire_count", _natural_t),
        ("zero_fill_count", ctypes.c_uint64),
        ("reactivations", ctypes.c_uint64),
        ("pageins", ctypes.c_uint64),
        ("pageouts", ctypes.c_uint64),
        ("faults", ctypes.c_uint64),
        ("cow_faults", ctypes.c_uint64),
        ("lookups", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
        ("purges", ctypes.c_uint64),
        ("purgeable_count", _natural_t),
        ("speculative_count", _natural_t),
        # rev1
        ("decompressions", ctypes.c_uint64),
        ("compressions", ctypes.c_uint64),
        ("swapins", ctypes.c_uint64),
        ("swapouts", ctypes.c_uint64),
        ("compressor_page_count", _natural_t),
        ("throttled_count", _natural_t),
        ("external_page_count", _natural_t),
        ("internal_page_count", _natural_t),
        ("total_uncompressed_pages_in_compressor", ctypes.c_uint64),
    ]


HOST_VM_INFO64 = 4  # mach/host_info.h
HOST_VM_INFO64_COUNT = ctypes.sizeof(VmStatistics64) // ctypes.sizeof(ctypes.c_int32)
# A rev0 kernel fills only up to speculative_count; the fields read here are all in it.
HOST_VM_INFO64_REV0_COUNT = VmStatistics64.decompressions.offset // ctypes.sizeof(ctypes.c_int32)


def memory_from_vm_statistics(
    stats: VmStatistics64, *, page_size: int, total_bytes: int, pressure_level: int | None
) -> MemoryReading:
    """A reading from one ``host_statistics64`` result, the page size, ``hw.memsize`` and the
    raw ``kern.memorystatus_vm_pressure_level`` (None when it could not be read).

    available = free_count (speculative included) + inactive + purgeable pages.
    """
    available_pages = stats.free_count + stats.inactive_count + stats.purgeable_count
    return MemoryReading(
        total_bytes=total_bytes,
        available_bytes=available_pages * page_size,
        wired_bytes=stats.wire_count * page_size,
        kernel_level=kernel_pressure_level(pressure_level),
    )


# -- macOS vm_stat ------------------------------------------------------------
#
# The agent no longer runs vm_stat; its text format is kept because published
# vm_stat captures are the real macOS numbers that tests can use off a Mac.

# vm_stat's labels for the fields of vm_statistics64 (system_cmds vm_stat.c,
# snapshot()); "Pages free" is printed as free_count - speculative_count.
VM_STAT_LABELS: Mapping[str, str] = {
    "Pages free": "free_count",
    "Pages active": "active_count",
    "Pages inactive": "inactive_count",
    "Pages speculative": "speculative_count",
    "Pages throttled": "throttled_count",
    "Pages wired down": "wire_count",
    "Pages purgeable": "purgeable_count",
    "Translation faults": "faults",
    "Pages copy-on-write": "cow_faults",
    "Pages zero filled": "zero_fill_count",
    "Pages reactivated": "reactivations",
    "Pages purged": "purges",
    "File-backed pages": "external_page_count",
    "Anonymous pages": "internal_page_count",
    "Pages stored in compressor": "total_uncompressed_pages_in_compressor",
    "Pages occupied by compressor": "compressor_page_count",
    "Decompressions": "decompressions",
    "Compressions": "compressions",
    "Pageins": "pageins",
    "Pageouts": "pageouts",
    "Swapins": "swapins",
    "Swapouts": "swapouts",
}

_PAGE_SIZE = re.compile(r"page size of (\d+) bytes")
_COUNTER = re.compile(r'^"?([^":]+)"?:\s+(\d+)\.?\s*$')


@dataclass(frozen=True, slots=True)
class VmStat:
    page_size: int
    pages: dict[str, int]

    @property
    def wired_bytes(self) -> int | None:
        wired = self.pages.get("Pages wired down")
        return None if wired is None else wired * self.page_size

    def statistics64(self) -> VmStatistics64:
        """The ``vm_statistics64`` this output was printed from (what ``host_statistics64`` returned).

        Undoes vm_stat's one computed line (``Pages free`` = free_count - speculative_count).
        A missing line reads as 0; an unknown one raises, since it means another format.
        """
        stats = VmStatistics64()
        for label, pages in self.pages.items():
            field = VM_STAT_LABELS.get(label)
            if field is None:
                raise ValueError(f"unknown vm_stat line {label!r}")
            setattr(stats, field, pages)
        stats.free_count = self.pages.get("Pages free", 0) + self.pages.get("Pages speculative", 0)
        return stats


def parse_vm_stat(text: str) -> VmStat | None:
    """Parse `vm_stat` output (counts are pages; the header gives the page size). None if unusable."""
    lines = text.splitlines()
    if not lines:
        return None
    size = _PAGE_SIZE.search(lines[0])
    if not size:
        return None
    pages: dict[str, int] = {}
    for line in lines[1:]:
        match = _COUNTER.match(line.strip())
        if match:
            pages[match.group(1).strip()] = int(match.group(2))
    if not pages:
        return None
    return VmStat(int(size.group(1)), pages)
