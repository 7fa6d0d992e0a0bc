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

Critical pressure is not always ours to relieve: a build job or a browser
can fill the Mac while our models sit still, and stopping a model then
frees too little to matter and takes a healthy service off the cluster for
nothing. So before evicting, the pressure is attributed (:func:`attribute`):
our services' resident memory against the memory in use (total − available).
Only when ours are more than ``min_own_share`` of it (default 0.5, LLMKube's
"friendly-fire" guard) is a victim stopped; otherwise the eviction is
refused with the reason ``PressureFromOtherProcesses`` and a message saying
so with the numbers, for the MemoryPressure condition and an Event.
(LLMKube's Go agent compares its processes' RSS with the whole RAM; ours
compares it with the memory in use, which is what the pressure is made of.
At Critical by the available share, less than 8 % is available, so the two
differ by under 8 %; under the kernel's level, in use can be well below the
RAM, and it is the truer measure of who is using it.)

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
SKIP_FOREIGN_PRESSURE = "PressureFromOtherProcesses"

# Evict only when our services hold more than this share of the memory in use
# (LLMKube's Go agent: more than half, its "friendly-fire" guard). 0 turns the guard off.
DEFAULT_MIN_OWN_SHARE = 0.5


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


# -- attribution ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who holds the memory in use: our services' resident memory, and the rest."""

    own_bytes: int
    in_use_bytes: int

    @property
    def share(self) -> float:
        """Our part of the memory in use, 0..1.

        Capped at 1: RSS counts pages the kernel may also count as available
        (clean file pages of a mapped model), so ours can exceed "in use".
        """
        if self.in_use_bytes <= 0:
            return 1.0 if self.own_bytes > 0 else 0.0
        return min(1.0, self.own_bytes / self.in_use_bytes)

    @property
    def other_bytes(self) -> int:
        return max(0, self.in_use_bytes - self.own_bytes)


def attribute(reading: MemoryReading, services: Sequence[ServiceMemory]) -> Attribution:
    """Our services' resident memory against the memory in use (total − available)."""
    in_use = max(0, reading.total_bytes - max(0, reading.available_bytes))
    return Attribution(sum(max(0, s.rss_bytes) for s in services), in_use)


def ours_to_relieve(attribution: Attribution, min_own_share: float) -> bool:
    """Whether our services are enough of the pressure for an eviction to be worth a model."""
    return min_own_share <= 0 or attribution.share > min_own_share


def validate_min_own_share(value: float) -> float:
    """The guard's threshold: a share in [0, 1) (0: evict whatever the cause)."""
    if not 0 <= value < 1:
        raise ValueError(f"the minimum own share of memory for an eviction must be in [0, 1), got {value}")
    return value


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def foreign_pressure_message(attribution: Attribution, min_own_share: float) -> str:
    """What the MemoryPressure condition and the EvictionSkipped Event say when the guard refuses."""
    return (f"pressure comes from other processes: this agent's services hold {_gib(attribution.own_bytes)} "
            f"of the {_gib(attribution.in_use_bytes)} in use ({attribution.share:.0%}), other processes "
            f"{_gib(attribution.other_bytes)}; eviction needs more than {min_own_share:.0%}")


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
    message: str = ""  # for people (condition, Event); empty: the reason says it all


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
         thresholds: Thresholds = Thresholds(), *, evict: bool = True,
         min_own_share: float = DEFAULT_MIN_OWN_SHARE) -> tuple[PressureState, tuple[Action, ...]]:
    """Advance one tick. `services` are the ones running now (with a live process).

    With `evict` False (the agent's default; eviction is opt-in) levels are
    still tracked and reported, but nothing is stopped. A victim is stopped
    only when our services hold more than `min_own_share` of the memory in
    use; otherwise the eviction is refused as ``PressureFromOtherProcesses``.
    The other refusals (nothing to spare, an eviction still under way) come
    first: they hold whoever causes the pressure."""
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
        attribution = attribute(reading, services)
        if isinstance(choice, Victim) and not ours_to_relieve(attribution, min_own_share):
            actions.append(EvictionSkipped(SKIP_FOREIGN_PRESSURE, foreign_pressure_message(attribution, min_own_share)))
        elif isinstance(choice, Victim):
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
