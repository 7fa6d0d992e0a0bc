"""What one request cost, recorded as its response is relayed (issue 21 point 7).

The proxy makes a `RequestCost` for each completion-shaped response (a 2xx answer
to a POST, JSON or an event stream) and hands its `feed` to the relay as a tap.
While the body flows the tap does two cheap things: notes the first event of a
stream (time to first token) and keeps the tail the usage scanner needs. The
token counts are read once, after the last byte has gone to the client.

Time to first token differs from time to first byte only for streams: an engine
may send the head (mlx_lm.server does, before it generates) or a role-only event
well before the first token; a JSON answer's first byte comes after its last token,
so it has no separate first token and is not observed here.
"""

from __future__ import annotations

import logging
from typing import Callable

from metal_agent.frontdoor.metrics import ServiceMetrics
from metal_agent.frontdoor.upstream import ResponseHead
from metal_agent.frontdoor.usage import UsageScan

log = logging.getLogger("metal_agent.frontdoor")

_CONTENT_KINDS = (b"application/json", b"text/event-stream")


def _content_type(head: ResponseHead) -> bytes:
    for name, value in head.headers:
        if name == b"content-type":
            return value.lower()
    return b""


class _Nothing(UsageScan):
    def __init__(self) -> None:
        super().__init__(chunked=False, stream=False)

    def feed(self, data: bytes) -> None:
        pass


_NOTHING = _Nothing()


class RequestCost:
    __slots__ = ("_svc", "_arrival", "_clock", "_scan", "_first_token")

    def __init__(self, svc: ServiceMetrics, arrival: float, clock: Callable[[], float], scan: UsageScan) -> None:
        self._svc = svc
        self._arrival = arrival
        self._clock = clock
        self._scan = scan
        self._first_token = not scan.stream  # only streams have one to wait for

    def feed(self, data: bytes) -> None:
        try:
            if not self._first_token and b"data:" in data:
                self._first_token = True
                self._svc.ttft.observe(self._clock() - self._arrival)
            self._scan.feed(data)
        except Exception:  # a bookkeeping bug must never break the relay (it runs in data_received)
            log.exception("front door: usage scan failed; this response's tokens are not counted")
            self._scan = _NOTHING

    def finish(self) -> None:
        """The response ended whole: count its tokens, or that it had none to count."""
        usage = self._scan.result()
        if usage is None:
            self._svc.usage_missing.inc()
            return
        self._svc.prompt_tokens.inc(usage.prompt_tokens)
        self._svc.completion_tokens.inc(usage.completion_tokens)


def request_cost(method: bytes, head: ResponseHead, svc: ServiceMetrics, arrival: float,
                 clock: Callable[[], float]) -> RequestCost | None:
    """A cost recorder for a response that may carry usage, else None (nothing to tap)."""
    if method != b"POST" or not 200 <= head.status < 300 or head.framing == "none":
        return None
    kind = _content_type(head)
    if not kind.startswith(_CONTENT_KINDS):
        return None
    scan = UsageScan(chunked=head.framing == "chunked", stream=kind.startswith(b"text/event-stream"))
    return RequestCost(svc, arrival, clock, scan)
