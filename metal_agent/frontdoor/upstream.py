"""Connections to the engines: a keep-alive pool and the frame-by-frame response relay."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol

from metal_agent.frontdoor.http1 import HOP_BY_HOP, ChunkedEnd, parse_head

Address = tuple[str, int]
MAX_IDLE_PER_UPSTREAM = 64


class Writer(Protocol):
    """Where a response goes: the client connection (write now, drain under backpressure)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class ConnectFailed(Exception):
    """The engine's port refused or did not answer: it is probably respawning."""


class UpstreamBroken(Exception):
    """The engine hung up or spoke nonsense mid-response."""


@dataclass
class UpstreamConn:
    address: Address
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def close(self) -> None:
        self.writer.close()


class Pool:
    def __init__(self, connect_timeout: float = 5.0) -> None:
        self._idle: dict[Address, list[UpstreamConn]] = {}
        self._connect_timeout = connect_timeout

    async def get(self, address: Address) -> UpstreamConn:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                conn.reused = True
                return conn
            conn.close()
        return await self.connect(address)

    async def connect(self, address: Address) -> UpstreamConn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address[0], address[1], limit=256 * 1024), self._connect_timeout)
        except (OSError, asyncio.TimeoutError) as err:
            raise ConnectFailed(f"{address[0]}:{address[1]}: {err}") from None
        return UpstreamConn(address, reader, writer)

    def put(self, conn: UpstreamConn) -> None:
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) < MAX_IDLE_PER_UPSTREAM and not conn.writer.is_closing():
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
    try:
        head = await conn.reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as err:
        raise UpstreamBroken(f"no response head: {err!r}") from None
    start, headers = parse_head(head)
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
                     head: bytes, first_byte: Callable[[], None]) -> None:
    """Copy the body as it comes; each chunk (an SSE event) goes to the client at once.

    The head is held back and sent with the first piece of body, so a short answer
    leaves in one write (one packet) instead of two.
    """
    reader = conn.reader
    try:
        if response.framing == "none":
            client.write(head)
            first_byte()
        elif response.framing == "length":
            await _relay_length(reader, client, head, response.length, first_byte)
        elif response.framing == "chunked":
            await _relay_chunked(reader, client, head, first_byte)
        else:
            client.write(head)
            first_byte()
            while data := await reader.read(65536):
                client.write(data)
                await client.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
        raise UpstreamBroken(f"response body cut short: {err!r}") from None
    await client.drain()


async def _relay_length(reader: asyncio.StreamReader, client: Writer, head: bytes,
                        length: int, first_byte: Callable[[], None]) -> None:
    left = length
    pending = head
    while left > 0:
        data = await reader.read(min(left, 65536))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        client.write(pending + data if pending else data)
        if pending:
            pending = b""
            first_byte()
        await client.drain()
    if pending:
        client.write(pending)
        first_byte()


async def _relay_chunked(reader: asyncio.StreamReader, client: Writer, head: bytes,
                         first_byte: Callable[[], None]) -> None:
    """Forward the engine's chunked bytes read by read, framing untouched (one SSE event
    is typically one read and one write), until the last chunk has passed."""
    scanner = ChunkedEnd()
    pending = head
    while True:
        data = await reader.read(65536)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
        end = scanner.feed(data)
        if end is not None:
            data = data[:end]
        client.write(pending + data if pending else data)
        if pending:
            pending = b""
            first_byte()
        if end is not None:
            return
        await client.drain()


def discard(conn: UpstreamConn) -> None:
    with contextlib.suppress(Exception):
        conn.close()
