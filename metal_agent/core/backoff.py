"""Restart back-off for crashed processes.

A model that crashes on load would otherwise be respawned in a tight loop,
re-reading gigabytes each time. Delays double from `initial` up to `cap`; a
process that stayed healthy for `reset_after` seconds earns a clean slate, so
one crash a week never turns into a five-minute outage. With
`first_immediate`, the first retry after a healthy run happens at once (as
Kubernetes restarts a crashed container): a one-off crash of a model costs
only its reload, and only a loop starts paying delays.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    reset_after: float = 120.0
    first_immediate: bool = False

    def delay(self, consecutive_failures: int) -> float:
        """Seconds to wait before the next start after `consecutive_failures` (≥ 1) failures."""
        steps = consecutive_failures - (2 if self.first_immediate else 1)
        if steps < 0:
            return 0.0
        return min(self.cap, self.initial * self.factor ** steps)

    def failures_after_run(self, previous_failures: int, healthy_seconds: float) -> int:
        """The failure count after a run that ended, given how long it was healthy."""
        if healthy_seconds >= self.reset_after:
            return 1
        return previous_failures + 1
