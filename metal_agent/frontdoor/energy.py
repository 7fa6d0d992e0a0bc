"""Energy per request: each power sample's energy split across the requests in flight during it.

The attribution (issue 21 point 7), stated so it can be checked:
- the agent measures the Mac's combined power in windows (powermetrics samples,
  `[start, end]` on the system-wide monotonic clock, with their joules) and hands
  each window here;
- within a window, power is taken as constant (that is all a sample says), so the
  energy of any stretch of it is its joules times the stretch's share of its length;
- at every instant, that instant's energy is split equally across the requests in
  flight on the Mac at that instant, whatever their service: n requests in flight,
  each is charged 1/n. A service's energy is the sum over its requests;
- energy spent while nothing is in flight (the idle Mac) is charged to nobody.

So the services' energies add up to at most the Mac's, and to exactly the Mac's
over a stretch where requests were always in flight. Equal split is a choice, not
a measurement: the power of one request cannot be told apart from another's on
shared hardware; weighting by tokens would charge a long prompt's prefill to the
wrong request.

Pure bookkeeping, on the caller's clock: `begin`/`end` cut the timeline into
segments with constant in-flight counts; `split` charges a window to the segments
it overlaps. Nothing is kept until the first window arrives (a Mac without power
samples pays two dictionary updates per request), and segments older than the
horizon are dropped.
"""

from __future__ import annotations

import collections

HORIZON_S = 120.0


class EnergySplit:
    def __init__(self, horizon_s: float = HORIZON_S) -> None:
        self.horizon_s = horizon_s
        self.enabled = False  # until the first power window: then segments are kept
        self._inflight: dict[str, int] = {}
        self._total = 0
        self._since = 0.0
        self._segments: collections.deque[tuple[float, float, tuple[tuple[str, int], ...], int]] = \
            collections.deque()

    def begin(self, key: str, now: float) -> None:
        self._cut(now)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        self._total += 1

    def end(self, key: str, now: float) -> None:
        self._cut(now)
        left = self._inflight.get(key, 0) - 1
        if left > 0:
            self._inflight[key] = left
        else:
            self._inflight.pop(key, None)
        self._total = max(0, self._total - 1)

    def _cut(self, now: float) -> None:
        if self.enabled and self._total and now > self._since:
            self._segments.append((self._since, now, tuple(self._inflight.items()), self._total))
            while self._segments and self._segments[0][1] < now - self.horizon_s:
                self._segments.popleft()
        self._since = now

    def split(self, start: float, end: float, joules: float, now: float) -> dict[str, float]:
        """Charge a window's energy to the services whose requests were in flight in it."""
        if not self.enabled:
            self.enabled = True
            self._since = now
            return {}  # nothing was kept before the first window
        self._cut(now)
        if end <= start or joules <= 0:
            return {}
        watts = joules / (end - start)
        out: dict[str, float] = {}
        for s0, s1, counts, total in self._segments:
            overlap = min(end, s1) - max(start, s0)
            if overlap <= 0:
                continue
            for key, n in counts:
                out[key] = out.get(key, 0.0) + watts * overlap * n / total
        while self._segments and self._segments[0][1] <= end:
            self._segments.popleft()  # windows come in order: nothing later needs these
        return out
