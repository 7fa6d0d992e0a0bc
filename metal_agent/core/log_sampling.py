"""Which refusals get a log line: the first few of each kind, then one summary per interval.

A refusal is worth a line (someone may be looking for why their scrape or
their `curl` failed), but a flood of them is not worth a line each: 2,000
made-up tokens would be 2,000 lines, burying everything else and costing
the disk what the attacker chooses. So per kind (a reason, say) an interval
opens at its first refusal; in it the first `first` are logged in full and
the rest only counted, and when it ends the count is logged once. Exact
totals live in a counter metric; the log only has to show that it happened,
what it looked like, and how much.

Pure: the caller passes the time and asks which summaries are due.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST = 5
INTERVAL_S = 60.0


@dataclass
class _Window:
    ends: float
    logged: int = 0
    suppressed: int = 0


@dataclass
class LogSampler:
    first: int = FIRST
    interval: float = INTERVAL_S
    _windows: dict[str, _Window] = field(default_factory=dict)

    def note(self, kind: str, now: float) -> bool:
        """A refusal of `kind` happened: True if it is to be logged in full, False if only counted."""
        window = self._windows.get(kind)
        if window is None or now >= window.ends:
            if window is not None and window.suppressed:
                # Its summary was not collected yet: keep counting into it; due() reports it.
                window.suppressed += 1
                return False
            window = self._windows[kind] = _Window(ends=now + self.interval)
        if window.logged < self.first:
            window.logged += 1
            return True
        window.suppressed += 1
        return False

    def due(self, now: float) -> list[tuple[str, int]]:
        """Kinds whose interval has ended with refusals not logged, and how many; each is reported once."""
        out = []
        for kind, window in list(self._windows.items()):
            if now >= window.ends:
                if window.suppressed:
                    out.append((kind, window.suppressed))
                del self._windows[kind]
        return out

    def next_due(self) -> float | None:
        """When the earliest pending summary falls due (None: nothing is waiting to be summarised)."""
        ends = [w.ends for w in self._windows.values() if w.suppressed]
        return min(ends) if ends else None
