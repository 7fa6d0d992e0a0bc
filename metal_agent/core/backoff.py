"""Back-off arithmetic: the one formula for every retry in the agent.

A model that crashes on load would otherwise be respawned in a tight loop,
re-reading gigabytes each time. Delays grow by `factor` from `initial` up to
`cap`; a process that stayed healthy for `reset_after` seconds earns a clean
slate, so one crash a week never turns into a five-minute outage. With
`first_immediate`, the first retry after a healthy run happens at once (as
Kubernetes restarts a crashed container): a one-off crash of a model costs
only its reload, and only a loop starts paying delays.

`jitter` spreads retries that fail together (every key of the work queue,
every Event, every background loop when the API server goes away) so that
they do not come back together as a thundering herd when it returns. The
delay is drawn uniformly from `[d * (1 - jitter), d]`, where `d` is the
un-jittered delay: 0 is deterministic (process restarts, whose delays are
shown to the user), 0.5 is "equal jitter", 1 is AWS's "full jitter". The
upper bound is never exceeded, so `cap` stays a promise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    reset_after: float = 120.0
    first_immediate: bool = False
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], not {self.jitter}")

    def ceiling(self, consecutive_failures: int) -> float:
        """The un-jittered delay after `consecutive_failures` (≥ 1) failures: the most `delay` returns."""
        steps = consecutive_failures - (2 if self.first_immediate else 1)
        if steps < 0:
            return 0.0
        try:
            return min(self.cap, self.initial * float(self.factor) ** steps)
        except OverflowError:  # a key that has failed for days: 2.0 ** 1100 is not a float
            return self.cap

    def delay(self, consecutive_failures: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt after `consecutive_failures` (≥ 1) failures."""
        ceiling = self.ceiling(consecutive_failures)
        if not self.jitter or not ceiling:
            return ceiling
        return ceiling * (1.0 - self.jitter * (rng or random).random())

    def failures_after_run(self, previous_failures: int, healthy_seconds: float) -> int:
        """The failure count after a run that ended, given how long it was healthy."""
        if healthy_seconds >= self.reset_after:
            return 1
        return previous_failures + 1
