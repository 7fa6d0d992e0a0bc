"""A steady request load: N client loops sending short completions back to back.

Issue 21 asks that respawns, crashes and agent restarts cost no request. The
proof needs traffic that is really there during each window, so every request
is recorded with its start and end (monotonic clock) and its outcome; a test
then asks what happened to the requests that overlapped a window, and waits on
progress (completions after an event) instead of on the clock.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass(frozen=True)
class Outcome:
    loop: int
    start: float
    end: float
    status: int | None  # None: no HTTP answer (the error says why)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class SteadyLoad:
    """`loops` clients POSTing `body` to `url` until stopped; a fresh connection per request
    (a cluster client's usual way, and no keep-alive luck either way)."""

    url: str
    model: str
    loops: int = 4
    timeout: float = 90.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def __aenter__(self) -> "SteadyLoad":
        self._tasks = [asyncio.ensure_future(self._loop(n)) for n in range(self.loops)]
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, n: int) -> None:
        body = {**SHORT, "model": self.model}
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    async with http.post(self.url, json=body) as resp:
                        text = await resp.text()
                        error = "" if resp.status == 200 else text[:300]
                        self.outcomes.append(Outcome(n, start, time.monotonic(), resp.status, error))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                    self.outcomes.append(Outcome(n, start, time.monotonic(), None, repr(err)))

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def ok_after(self, moment: float) -> int:
        return sum(1 for o in self.outcomes if o.ok and o.start >= moment)

    def progressed(self, moment: float, each: int = 2):
        """A condition for wait_for: every loop has completed `each` requests begun after `moment`."""
        def check() -> bool:
            done = [0] * self.loops
            for o in self.outcomes:
                if o.ok and o.start >= moment:
                    done[o.loop] += 1
            return min(done) >= each
        return check

    def overlapping(self, begin: float, end: float) -> list[Outcome]:
        """The requests that were open at some point between `begin` and `end`."""
        return [o for o in self.outcomes if o.start <= end and o.end >= begin]

    def longest_ms(self, begin: float, end: float) -> float:
        spans = [o.end - o.start for o in self.overlapping(begin, end)]
        return max(spans, default=0.0) * 1000
