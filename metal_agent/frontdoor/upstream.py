"""Connections to the engines: a keep-alive pool and the frame-by-frame response relay."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol

from metal_agent.frontdoor.http1 import HOP_BY_HOP, MAX_HEAD, BadRequest, ChunkedEnd, parse_head

Address = tuple[str, int]
MAX_IDLE_PER_UPSTREAM = 64


class Writer(Protocol):
    """Where a response goes: the client connection (write now; drain under back-pressure)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def writing_paused(self) -> bool: ...


class ConnectFailed(Exception):
    """The engine's port refused or did not answer: it is probably respawning."""


class UpstreamBroken(Exception):
    """The engine hung up or spoke nonsense mid-response."""


class Stalled(Exception):
    """No response head, and the engine failed a health probe meanwhile: it is hung."""


class UpstreamConn(asyncio.Protocol):
    """One connection to an engine. The response body is forwarded from `data_received`
    straight to the client, with no coroutine wake-up per chunk: a streamed token costs
    one read and one write. Back-pressure: a client that cannot keep up pauses reading."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.reused = False
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self._head: asyncio.Future[bytes] | None = None
        self._body: asyncio.Future[None] | None = None
        self._client: Writer | None = None
        self._framing = "none"
        self._left = 0
        self._scanner: ChunkedEnd | None = None
        self._pending = b""
        self._first: Callable[[], None] | None = None
        self._tap: Callable[[bytes], None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._body is not None:
            self._forward(data)
            return
        self.buf += data
        head = self._head
        if head is not None and not head.done():
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                raw = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                head.set_result(raw)
            elif len(self.buf) > MAX_HEAD:
                head.set_exception(UpstreamBroken("response head too large"))

    def eof_received(self) -> bool:
        self._lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        head, body = self._head, self._body
        if head is not None and not head.done():
            head.set_exception(UpstreamBroken(f"closed before a response head ({exc!r})"))
        if body is not None and not body.done():
            if self._framing == "close":
                body.set_result(None)
            else:
                body.set_exception(UpstreamBroken(f"closed mid-body ({exc!r})"))

    @property
    def awaiting_head(self) -> bool:
        return self._head is not None and not self._head.done()

    def abort_stalled(self) -> None:
        """Give up on a head from a hung engine: the request's reader gets `Stalled`."""
        head = self._head
        if head is not None and not head.done():
            head.set_exception(Stalled("the engine stopped answering"))
        self.close()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def read_head(self) -> bytes:
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            raw = bytes(self.buf[:end + 4])
            del self.buf[:end + 4]
            return raw
        if self.closed:
            raise UpstreamBroken("the connection is closed")
        self._head = asyncio.get_running_loop().create_future()
        try:
            return await self._head
        finally:
            self._head = None

    async def relay(self, response: "ResponseHead", client: Writer, head: bytes,
                    first_byte: Callable[[], None], tap: Callable[[bytes], None] | None = None) -> None:
        """Send `head` with the first body bytes, then the body as it arrives, until its end.
        `tap` sees each piece of the body as sent on, after it was written to the client."""
        if response.framing == "none" or (response.framing == "length" and response.length == 0):
            client.write(head)
            first_byte()
            return
        self._client, self._framing, self._left = client, response.framing, response.length
        self._scanner = ChunkedEnd() if response.framing == "chunked" else None
        self._pending, self._first, self._tap = head, first_byte, tap
        body = self._body = asyncio.get_running_loop().create_future()
        try:
            if self.buf:
                data = bytes(self.buf)
                self.buf.clear()
                self._forward(data)
            if self.closed and not body.done():
                self._lost(None)
            await body
        finally:
            self._body = self._client = self._first = self._tap = None
            if self._paused and not self.closed and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()

    def _forward(self, data: bytes) -> None:
        body, client = self._body, self._client
        if body is None or body.done() or client is None:
            self.close()  # bytes past the response's end: not a connection to reuse
            return
        done = False
        if self._framing == "length":
            if len(data) >= self._left:
                if len(data) > self._left:
                    self.closed = True  # trailing garbage: do not pool
                data, done = data[:self._left], True
            self._left -= len(data)
        elif self._scanner is not None:
            try:
                end = self._scanner.feed(data)
            except ValueError as err:
                body.set_exception(UpstreamBroken(str(err)))
                return
            if end is not None:
                if end < len(data):
                    self.closed = True
                data, done = data[:end], True
        if self._pending:
            client.write(self._pending + data)
            self._pending = b""
            if self._first is not None:
                self._first()
        else:
            client.write(data)
        if self._tap is not None:
            self._tap(data)
        if done:
            body.set_result(None)
        elif client.writing_paused() and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._resume_when_drained(client))

    async def _resume_when_drained(self, client: Writer) -> None:
        try:
            await client.drain()
        except ConnectionError:
            self.close()
            return
        if self._paused and not self.closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()


class Pool:
    def __init__(self, connect_timeout: float = 5.0) -> None:
        self._idle: dict[Address, list[UpstreamConn]] = {}
        self._connect_timeout = connect_timeout

    async def get(self, address: Address) -> UpstreamConn:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
            conn.close()
        return await self.connect(address)

    async def connect(self, address: Address) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConn(address), address[0], address[1]),
                self._connect_timeout)
        except (OSError, asyncio.TimeoutError) as err:
            raise ConnectFailed(f"{address[0]}:{address[1]}: {err}") from None
        return conn

    def put(self, conn: UpstreamConn) -> None:
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) < MAX_IDLE_PER_UPSTREAM and not conn.closed:
            idle.append(conn)
        else:
            conn.close()

    def drop(self, address: Address) -> None:
        """The engine moved: its idle connections point at a process that is gone."""
        for conn in self._idle.pop(address, []):
            conn.close()

    def close(self) -> None:
        for address in list(self._idle):
            self.drop(address)


@dataclass
class ResponseHead:
    status: int
    raw_start: bytes
    headers: list[tuple[bytes, bytes]]
    framing: str          # "none" | "length" | "chunked" | "close"
    length: int = 0
    upstream_keep_alive: bool = True


async def read_response_head(conn: UpstreamConn, method: bytes) -> ResponseHead:
    """Read the engine's response head; UpstreamBroken when it hangs up before one."""
    head = await conn.read_head()
    try:
        start, headers = parse_head(head)
    except BadRequest as err:
        raise UpstreamBroken(f"bad response head: {err.message}") from None
    parts = start.split(b" ", 2)
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        raise UpstreamBroken(f"bad status line {start[:80]!r}") from None
    response = ResponseHead(status, start, headers, "close")
    connection = b""
    for name, value in headers:
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            response.framing = "chunked"
        elif name == b"content-length" and response.framing != "chunked":
            if not value.isdigit():
                raise UpstreamBroken(f"bad Content-Length {value[:20]!r}")
            response.framing, response.length = "length", int(value)
        elif name == b"connection":
            connection = value.lower()
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        response.framing = "none"
    response.upstream_keep_alive = b"close" not in connection and response.framing != "close"
    return response


def client_head(response: ResponseHead, keep_alive: bool) -> bytes:
    """The head sent to the client: the engine's, with this hop's own framing headers."""
    out = [response.raw_start, b"\r\n"]
    for name, value in response.headers:
        if name not in HOP_BY_HOP:
            out += (name, b": ", value, b"\r\n")
    if response.framing == "chunked":
        out.append(b"transfer-encoding: chunked\r\n")
    elif response.framing == "length":
        out += (b"content-length: ", str(response.length).encode(), b"\r\n")
    out += (b"connection: ", b"keep-alive" if keep_alive else b"close", b"\r\n\r\n")
    return b"".join(out)


async def relay_body(conn: UpstreamConn, response: ResponseHead, client: Writer,
                     head: bytes, first_byte: Callable[[], None],
                     tap: Callable[[bytes], None] | None = None) -> None:
    """Copy the body as it comes; the head leaves with the first piece of body, so a
    short answer is one write (one packet) instead of two."""
    await conn.relay(response, client, head, first_byte, tap)


def discard(conn: UpstreamConn) -> None:
    with contextlib.suppress(Exception):
        conn.close()
