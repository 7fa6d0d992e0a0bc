"""What `/readyz` says: each part registers its own check; the first part not ready says why.

A check returns True or the reason it is not ready. Checks are asked in the
order they were added, so the most telling reason comes first: an API server
that cannot be reached explains everything after it.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Protocol

Check = Callable[[], "bool | str"]


class Readiness:
    def __init__(self) -> None:
        self._checks: list[tuple[str, Check]] = []
        self._notes: list[Callable[[], str | None]] = []

    def add_note(self, note: Callable[[], "str | None"]) -> None:
        """Something said beside "ready" without making the agent unready (macOS throttling)."""
        self._notes.append(note)

    def note(self) -> str | None:
        return "; ".join(n for n in (note() for note in self._notes) if n) or None

    def add(self, part: str, check: Check) -> None:
        self._checks.append((part, check))

    def parts(self) -> list[str]:
        return [part for part, _ in self._checks]

    def __call__(self) -> bool | str:
        for _, check in self._checks:
            verdict = check()
            if verdict is not True:
                return verdict
        return True


class _Watch(Protocol):
    unreachable_since: float | None


class HeartbeatHealth:
    """Since when the slices' heartbeats have all failed (None: they go through). A quiet
    watch notices a blackholed API server only at its timeout; a heartbeat sooner."""

    def __init__(self) -> None:
        self.failing_since: float | None = None

    def round(self, sent: int, failed: int) -> None:
        if sent and failed == sent:
            self.failing_since = self.failing_since or time.monotonic()
        elif sent:
            self.failing_since = None


class ApiReachable:
    """Not ready while a watch (or every heartbeat) cannot reach the API server; the engines
    keep being supervised locally meanwhile, and the reason says how many."""

    def __init__(self, watches: Iterable[_Watch], heartbeats: HeartbeatHealth, supervised: Callable[[], int]) -> None:
        self.watches = tuple(watches)
        self.heartbeats = heartbeats
        self.supervised = supervised

    def __call__(self) -> bool | str:
        since = [w.unreachable_since for w in self.watches if w.unreachable_since is not None]
        if self.heartbeats.failing_since is not None:
            since.append(self.heartbeats.failing_since)
        if since:
            return (f"API server unreachable for {time.monotonic() - min(since):.0f}s; "
                    f"supervising {self.supervised()} llama-server(s) locally")
        return True


def synced_check(synced: Callable[[], bool]) -> Check:
    """Not ready until the first list of InferenceServices and Models (and, in a fleet, the Leases)."""
    def check() -> bool | str:
        return True if synced() else "waiting for the first list of InferenceServices and Models"
    return check
