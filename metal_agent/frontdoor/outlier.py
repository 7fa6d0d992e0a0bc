"""Passive health: the traffic itself says when an engine fails (Envoy's outlier detection).

The agent's supervisor probes each engine, but on a rhythm a Mac can afford idle.
The front door sees every request, so it judges faster where it matters, at no idle
cost:
- an engine that drops a connection mid-answer is taken out of rotation at once
  (`failed`); its route holds new requests (they wait, or get 503 at their queue
  timeout) instead of sending them to a broken process;
- a request still without a response head after `STALL_S` starts one /health probe
  of its engine (shared by every request waiting on it); an engine that does not
  answer that probe within `PROBE_TIMEOUT_S` is hung: it is ejected, and the requests
  waiting on it go back to the route's queue (they were never answered, so re-sending
  is safe) rather than hanging with it. Out of rotation within about a second.
- an ejected engine is probed on a short, growing rhythm and comes back on the first
  200; a new table giving the route another engine (or state) ends an ejection too.

Probes only happen while something is wrong or a request is waiting: an idle engine
costs nothing here. Only transport failures count, never a 5xx answer: a stranger's
bad request could make an engine answer 500, and must not take it out for others.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from metal_agent.frontdoor.gate import Gate
from metal_agent.frontdoor.upstream import UpstreamConn

log = logging.getLogger("metal_agent.frontdoor")

STALL_S = 0.3
PROBE_TIMEOUT_S = 0.5
RECOVER_FIRST_S = 0.05
RECOVER_MAX_S = 1.0
#: A waiting request re-checks its engine at twice the last wait, up to STALL_MAX_S, so a long
#: non-streamed completion (no head until its last token) costs a few probes, not many.
STALL_MAX_S = 5.0


async def probe(address: tuple[str, int], path: bytes = b"/health", timeout: float | None = None) -> bool:
    """True when the engine answers `path` with 200 within `timeout` (PROBE_TIMEOUT_S)."""
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address[0], address[1])
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: " + f"{address[0]}:{address[1]}".encode()
                         + b"\r\nConnection: close\r\n\r\n")
            line = await reader.readline()
        return line.split(b" ", 2)[1:2] == [b"200"]
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


class Outlier:
    """One route's passive health, beside its gate (which does the holding)."""

    def __init__(self, key: str, gate: Gate, ejections: Counter) -> None:
        self.key = key
        self.gate = gate
        self.ejections = ejections
        self._check: asyncio.Task[bool] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._closed = False

    # -- what requests report ------------------------------------------------------------------

    def failed(self, address: tuple[str, int], why: str) -> None:
        """A request saw the engine at `address` fail (it hung up, or a probe showed it hung):
        eject it now, unless the route has moved on to another engine meanwhile."""
        upstream = self.gate.route.upstream
        if self._closed or upstream != address or self.gate.ejected:
            return
        self.gate.eject()
        self.ejections.inc()
        log.warning("front door: %s: engine %s:%d out of rotation (%s); holding its requests until it "
                    "answers /health", self.key, upstream[0], upstream[1], why)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover(upstream))

    def watch(self, up: UpstreamConn) -> asyncio.TimerHandle:
        """Call once the request is sent; cancel the handle when its head arrives."""
        return asyncio.get_running_loop().call_later(STALL_S, self._stalled, up, STALL_S)

    # -- probing -------------------------------------------------------------------------------

    def _stalled(self, up: UpstreamConn, waited: float) -> None:
        if self._closed or not up.awaiting_head:
            return
        if self._check is None or self._check.done():
            self._check = asyncio.get_running_loop().create_task(probe(up.address))
        self._check.add_done_callback(lambda check: self._checked(up, check, waited))

    def _checked(self, up: UpstreamConn, check: asyncio.Task[bool], waited: float) -> None:
        if self._closed or not up.awaiting_head:
            return
        if check.cancelled() or not check.result():
            self.failed(up.address, f"no answer to /health within {PROBE_TIMEOUT_S:g}s while a request waited "
                        f"{waited:g}s for its response")
            up.abort_stalled()
            return
        nxt = min(waited * 2, STALL_MAX_S)  # alive and busy: look again later
        up_handle = asyncio.get_running_loop().call_later(nxt, self._stalled, up, nxt)
        del up_handle  # ends with the request: _stalled returns at once once the head came

    async def _recover(self, upstream: tuple[str, int]) -> None:
        delay = RECOVER_FIRST_S
        while self.gate.ejected and not self._closed and self.gate.route.upstream == upstream:
            if await probe(upstream):
                log.info("front door: %s: engine %s:%d answers /health again; back in rotation",
                         self.key, upstream[0], upstream[1])
                self.gate.reinstate()
                return
            await asyncio.sleep(delay)  # the probe rhythm of an ejected engine
            delay = min(delay * 2, RECOVER_MAX_S)

    def close(self) -> None:
        self._closed = True
        for task in (self._check, self._recovery):
            if task is not None and not task.done():
                task.cancel()
