"""`GET /health` over one kept-alive connection: the supervisor's frequent, cheap probe.

Every ready server is probed twice a second (see `SupervisorSettings`), so
the probe's own cost is the agent's idle CPU on a Mac that serves many
models. A general HTTP client spends about 0.15 ms of CPU per request on
machinery a health check does not need (measured against llama-server on
this project's machine); one request line on a connection that stays open,
and a status line and headers read back, cost half that. The connection is
reused while the server keeps it open (llama-server's HTTP library allows a
few requests per connection; servers that close after each answer are simply
reconnected), and dropped after any failure or timeout, since a hung server
may still owe the rest of an answer.
"""

from __future__ import annotations

import asyncio
import contextlib

from metal_agent.tasks import within


class HealthProbe:
    def __init__(self, host: str, port: int, path: str = "/health") -> None:
        self.host = host
        self.port = port
        self._request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n\r\n".encode()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self, timeout: float) -> bool:
        """True when the server answers 200 within `timeout` seconds."""
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that lands as the exchange completes, and a supervisor being stopped must stop.
            status, keep = await within(self._exchange_or_fresh(), timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            self.close()
            return False
        if not keep:
            self.close()
        return status == 200

    async def _exchange_or_fresh(self) -> tuple[int, bool]:
        """A kept connection the server closed while idle (llama-server closes after 5 s, the
        liveness interval) hangs up before answering: that is not the server failing, so ask
        again once on a new connection. A fresh connection that hangs up is a failure."""
        if self._conn is None:
            return await self._exchange()
        try:
            return await self._exchange()
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            return await self._exchange()

    async def _exchange(self) -> tuple[int, bool]:
        if self._conn is None:
            self._conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._conn
        writer.write(self._request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, code = lines[0].split(" ", 2)[:2]
        headers = {k.strip().lower(): v.strip().lower() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if "chunked" in headers.get("transfer-encoding", ""):
            return int(code), False  # a body we do not walk: this connection is done
        length = headers.get("content-length")
        if length is None:
            return int(code), False  # the body runs to the end of the connection
        await reader.readexactly(int(length))
        keep = headers.get("connection") != "close" and (version != "HTTP/1.0" or headers.get("connection") == "keep-alive")
        return int(code), keep

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn[1].close()
            self._conn = None
