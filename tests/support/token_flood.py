"""Made-up bearer tokens against the agent's network /metrics, and a real scrape beside them.

Shared by tests/security/test_review_flood.py and bench/review_flood.py: a
flood of junk tokens from one or many source addresses, a Prometheus-like
scraper with a real ServiceAccount token running during it, and the API
server's own count of the TokenReviews it received.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

REVIEWS = re.compile(r'^apiserver_request_total\{.*[{,]resource="tokenreviews".* (\S+)$')


async def token_reviews(control_plane) -> float:
    """TokenReviews the API server has answered (its own apiserver_request_total)."""
    return sum(float(m.group(1)) for line in (await control_plane.metrics_text()).splitlines()
               if (m := REVIEWS.match(line)))


def junk(n: int) -> list[str]:
    """Tokens shaped like a ServiceAccount JWT (three base64url parts) that nobody issued."""
    return [f"eyJhbGciOiJSUzI1NiJ9.{secrets.token_urlsafe(96)}.{secrets.token_urlsafe(64)}" for _ in range(n)]


@dataclass
class Flood:
    statuses: Counter = field(default_factory=Counter)
    retry_after_missing: int = 0
    first_429: float | None = None
    last_429: float | None = None
    seconds: float = 0.0


async def flood(url: str, tokens: list[str], *, sources: list[str | None], concurrency: int = 32) -> Flood:
    """GET `url` once per token, `concurrency` at a time, spread over `sources` (None: the default)."""
    result = Flood()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for token in tokens:
        queue.put_nowait(token)

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            token = queue.get_nowait()
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                result.statuses[resp.status] += 1
                if resp.status == 429:
                    now = time.monotonic()
                    result.first_429 = result.first_429 or now
                    result.last_429 = now
                    if not resp.headers.get("Retry-After", "").isdigit():
                        result.retry_after_missing += 1

    sessions = [aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, local_addr=(source, 0) if source else None),
        timeout=aiohttp.ClientTimeout(total=60)) for source in sources]
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(worker(sessions[i % len(sessions)]) for i in range(concurrency)))
    finally:
        result.seconds = time.monotonic() - t0
        for session in sessions:
            await session.close()
    return result


@dataclass
class Scrapes:
    latencies: list[float] = field(default_factory=list)  # seconds
    answered_at: list[float] = field(default_factory=list)  # monotonic
    statuses: Counter = field(default_factory=Counter)


async def scrape_until(url: str, token: str, done: asyncio.Event, *, source: str | None = None,
                       interval: float = 0.05) -> Scrapes:
    """Scrape `url` with `token` every `interval` until `done` (at least once), like a Prometheus."""
    out = Scrapes()
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        while True:
            t0 = time.monotonic()
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                out.statuses[resp.status] += 1
            out.answered_at.append(time.monotonic())
            out.latencies.append(out.answered_at[-1] - t0)
            if done.is_set():
                return out
            try:
                await asyncio.wait_for(done.wait(), interval)
            except TimeoutError:
                pass
