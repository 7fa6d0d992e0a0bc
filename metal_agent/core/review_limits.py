"""How many reviews of tokens the cluster has never vouched for the network may cost: a budget per source and in all.

Every request on the registered address with a token the agent has not
seen costs the API server a TokenReview (`core/metrics_auth.py`). Anyone
who can reach the Mac can make up tokens, so without a budget each made-up
token is a review: 2,000 junk tokens were 2,000 reviews in 3.8 s, and a
real scrape waited behind them. A token bucket per source address bounds
what one client may cost (by default one review a second, ten in a burst:
a Prometheus presents one token per hour or so); a second, global bucket
bounds what many sources together may cost (ten a second, twenty in a
burst). Beyond either, the request is answered 429 with Retry-After and no
review is sent.

Only reviews of unknown tokens draw on these buckets. A token the cluster
allowed recently (its verdict cached, `DecisionCache.known`) is answered
from the cache, or re-reviewed on its own lane that junk cannot queue, so
Prometheus is never made to wait behind a flood.

Pure: the caller passes the time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

PER_SOURCE_RATE = 1.0  # reviews of unknown tokens per second, per source address (--token-review-rate)
GLOBAL_RATE = 10.0  # ... from all sources together (--token-review-global-rate)
PER_SOURCE_BURST_S = 10.0  # a source may spend ten seconds' worth at once
GLOBAL_BURST_S = 2.0  # all sources together: two seconds' worth
MAX_SOURCES = 4096  # buckets kept; the least recently seen source goes first (and comes back with a full one)

SOURCE = "source"
GLOBAL = "global"


@dataclass
class TokenBucket:
    rate: float  # tokens added per second
    burst: float  # capacity
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> "TokenBucket":
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0: there is one now). Takes nothing."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    retry_after: float = 0.0  # seconds, when not admitted
    scope: str = ""  # SOURCE or GLOBAL: which budget was spent


def burst_for(rate: float, seconds: float) -> float:
    return max(1.0, rate * seconds)


class ReviewLimiter:
    """One bucket per source address and one for all: a review is sent only if both have a token."""

    def __init__(self, *, per_source_rate: float = PER_SOURCE_RATE, global_rate: float = GLOBAL_RATE,
                 per_source_burst: float | None = None, global_burst: float | None = None,
                 max_sources: int = MAX_SOURCES) -> None:
        if per_source_rate <= 0 or global_rate <= 0:
            raise ValueError("review rates must be positive")
        self.per_source_rate = per_source_rate
        self.per_source_burst = per_source_burst or burst_for(per_source_rate, PER_SOURCE_BURST_S)
        self.global_rate = global_rate
        self.global_burst = global_burst or burst_for(global_rate, GLOBAL_BURST_S)
        self._max_sources = max_sources
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._global: TokenBucket | None = None

    def admit(self, source: str, now: float) -> Admission:
        """May one review for `source` be sent now? If so its tokens are taken."""
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = self._sources[source] = TokenBucket.full(self.per_source_rate, self.per_source_burst, now)
            while len(self._sources) > self._max_sources:
                self._sources.popitem(last=False)
        self._sources.move_to_end(source)
        if self._global is None:
            self._global = TokenBucket.full(self.global_rate, self.global_burst, now)
        if (wait := bucket.wait(now)) > 0:
            return Admission(False, wait, SOURCE)  # nothing taken from the global budget
        if (wait := self._global.wait(now)) > 0:
            return Admission(False, wait, GLOBAL)
        bucket.take(now)
        self._global.take(now)
        return Admission(True)

    def __len__(self) -> int:
        return len(self._sources)
