"""Memory pressure decisions: level, eviction victim, respawn blocking (pure).

Admission keeps what the agent starts inside a budget, but the rest of the
Mac is not ours: a user opening a browser with 200 tabs can push the machine
into swap with our models loaded. The watchdog then frees memory the only
way it can, by stopping one of our services, and keeps it stopped until the
pressure is gone. Everything it decides is here, as a state machine driven
by readings, so the adapter only measures and executes.

Levels, from the share of RAM available (free + reclaimable):
* Normal:   ≥ 15 %
* Warning:  < 15 % — reported (condition, Event), nothing stopped
* Critical: < 8 %  — one service evicted per tick

Levels rise at once but fall only when the share clears the threshold by a
margin (3 points by default: Critical ends at ≥ 11 %, Warning at ≥ 18 %).
Without it, stopping a model would drop pressure just below the line, the
evicted service would resume, and the Mac would flap between the two.

Evicted services stay blocked until the level is back to Normal, then all
of them are unblocked together and resume on their own. (LLMKube's agent
never returned to Normal, so evicted services stayed down until restart.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Sequence, Union

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
    level = classify(state.level, reading.available_bytes, reading.total_bytes, thresholds)
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


# -- macOS vm_stat ------------------------------------------------------------

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
