"""Load on demand, unload when idle (issue 21, point 3): the rules, without I/O.

A Mac holds only what fits; an owner with more models than memory opts a
service in with annotations, and the agent then unloads it after a quiet
spell and loads it again when a request arrives (the front door holds the
request meanwhile). The annotations are written by a stranger, so they are
read strictly: an allowlisted spelling and bounded values, or an error naming
the annotation. A bad value only makes the service an ordinary always-loaded
one; it never stops a model that serves.

When memory is short at admission, `choose_evictions` picks whom to unload:
the least recently used idle on-demand services, never one with requests in
flight or queued, never one that did not opt in, never one with
`evictionProtection`, and none at all unless unloading them frees enough.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = [
    "IDLE_AFTER", "ON_DEMAND", "OnDemandError", "OnDemandPolicy", "Resident", "choose_evictions",
    "format_seconds", "parse_duration", "read_policy", "seconds_until_idle",
]

ON_DEMAND = "metal-agent.llmkube.dev/on-demand"
IDLE_AFTER = "metal-agent.llmkube.dev/idle-unload-after"
DEFAULT_IDLE_S = 15 * 60.0
MIN_IDLE_S = 1.0  # short enough for tests and drills; a real owner picks minutes
MAX_IDLE_S = 7 * 24 * 3600.0

# Go's time.ParseDuration spellings a person writes in an annotation: "90s", "15m", "1h30m".
_DURATION = re.compile(r"^(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,7})s)?$")


class OnDemandError(ValueError):
    """An annotation that cannot be honoured; the message names it and says what would be."""


@dataclass(frozen=True)
class OnDemandPolicy:
    idle_after_s: float = DEFAULT_IDLE_S


def parse_duration(text: str) -> float:
    """`15m` -> 900.0. Hours, minutes and seconds in that order, whole numbers, nothing else."""
    match = _DURATION.match(text)
    if not text or match is None:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def format_seconds(seconds: float) -> str:
    """900 -> "15m", 5400 -> "1h30m", 45 -> "45s": how Events and status say a duration."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


def read_policy(annotations: Mapping[str, object] | None) -> OnDemandPolicy | None:
    """The service's on-demand policy (None: it did not opt in). Raises OnDemandError."""
    annotations = annotations or {}
    flag = annotations.get(ON_DEMAND)
    idle = annotations.get(IDLE_AFTER)
    if flag is None or flag == "false":
        if idle is not None:
            raise OnDemandError(f"annotation {IDLE_AFTER} has no effect without {ON_DEMAND}: \"true\"")
        return None
    if flag != "true":
        raise OnDemandError(f"annotation {ON_DEMAND} must be \"true\" or \"false\", not {str(flag)[:40]!r}")
    if idle is None:
        return OnDemandPolicy()
    if not isinstance(idle, str):
        raise OnDemandError(f"annotation {IDLE_AFTER} must be a string like \"15m\"")
    try:
        seconds = parse_duration(idle)
    except ValueError:
        raise OnDemandError(f"annotation {IDLE_AFTER}: {idle[:40]!r} is not a duration like 90s, 15m or 1h30m") from None
    if not MIN_IDLE_S <= seconds <= MAX_IDLE_S:
        raise OnDemandError(f"annotation {IDLE_AFTER}: {idle!r} is outside {format_seconds(MIN_IDLE_S)}.."
                            f"{format_seconds(MAX_IDLE_S)}")
    return OnDemandPolicy(idle_after_s=seconds)


def seconds_until_idle(policy: OnDemandPolicy, *, now: float, loaded_at: float, last_active: float | None,
                       busy: bool) -> float | None:
    """How long until a loaded service is due to be unloaded (<= 0: now); None while busy.

    Quiet is counted from the later of its load and its last request (arrival or end), so a
    model loaded for a request that never came still goes after the idle duration.
    """
    if busy:
        return None
    since = max(loaded_at, last_active or 0.0)
    return since + policy.idle_after_s - now


@dataclass(frozen=True)
class Resident:
    """A loaded service as the eviction choice sees it."""

    key: str
    bytes: int  # its memory estimate, counted against the budget
    on_demand: bool
    protected: bool  # spec.evictionProtection
    busy: bool  # requests in flight or queued at the front door (unknown counts as busy)
    last_active: float  # its last request, else when it was loaded


def choose_evictions(residents: Iterable[Resident], shortfall_bytes: int, *, for_key: str) -> tuple[str, ...]:
    """The services to unload so that `for_key` fits, least recently used first; () when the
    idle on-demand ones together cannot free `shortfall_bytes` (unloading some would only
    cost their users a reload for nothing)."""
    if shortfall_bytes <= 0:
        return ()
    candidates = sorted((r for r in residents if r.key != for_key and r.on_demand and not r.protected
                         and not r.busy), key=lambda r: (r.last_active, r.key))
    chosen: list[str] = []
    freed = 0
    for resident in candidates:
        chosen.append(resident.key)
        freed += resident.bytes
        if freed >= shortfall_bytes:
            return tuple(chosen)
    return ()
