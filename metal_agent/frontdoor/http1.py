"""Just enough HTTP/1.1 for a fast reverse proxy on plain asyncio streams.

Why not aiohttp here: a request through aiohttp.web and ClientSession costs
about a millisecond of Python per hop; the front door's budget is 0.3 ms p50
(issue 21). Requests are read whole (OpenAI requests are small, and a whole
body can be re-sent when the engine was mid-respawn); responses are relayed
frame by frame as they arrive, so SSE reaches the client one event at a time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
READ_SIZE = 64 * 1024

#: Headers that describe one hop, not the message: never forwarded as received.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"expect",
})


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]   # names lower-cased
    body: bytes = b""
    keep_alive: bool = True

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split a message head into its start line and (lower-cased name, value) pairs."""
    lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


class ClientConn(asyncio.Protocol):
    """The client side of one connection, as a protocol: bytes land in a buffer the
    request reader drains, and a hang-up is seen the moment the kernel reports it.

    A hang-up while a request is in flight (`busy`) cancels the connection's task, which
    closes the engine connection and so frees the engine's slot; no per-request watcher
    task is needed. Bytes of a pipelined next request simply wait in the buffer.
    """

    def __init__(self, serve: Callable[["ClientConn"], Awaitable[None]]) -> None:
        self._serve = serve
        self.buf = bytearray()
        self.eof = False
        self.busy = False
        self.gone = False
        self.peer = ""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self._data: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused_reading = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = (transport.get_extra_info("peername") or ("",))[0]
        self.task = asyncio.get_running_loop().create_task(self._serve(self))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > MAX_HEAD and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._hung_up()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._hung_up()
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client went away"))

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _hung_up(self) -> None:
        if not self.eof:
            self.eof = True
            self._wake()
            if self.busy and self.task is not None:
                self.gone = True
                self.task.cancel()

    def _wake(self) -> None:
        waiter, self._data = self._data, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the stream side -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        if self._writable is not None:
            await self._writable

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def writing_paused(self) -> bool:
        return self._writable is not None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _fill(self) -> None:
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        self._data = asyncio.get_running_loop().create_future()
        await self._data

    async def read_head(self) -> bytes | None:
        """The next request's head, or None when the client closed between requests."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise BadRequest(431, "request head too large")
            if self.eof:
                if self.buf.strip():
                    raise BadRequest(400, "connection closed mid-request")
                return None
            await self._fill()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise BadRequest(400, "connection closed mid-body")
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if self.eof or len(self.buf) > MAX_HEAD:
                raise BadRequest(400, "bad chunked body")
            await self._fill()


async def read_request(conn: ClientConn) -> Request | None:
    head = await conn.read_head()
    if head is None:
        return None
    start, headers = parse_head(head)
    parts = start.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "malformed request line")
    request = Request(parts[0], parts[1], parts[2], headers)
    connection = (request.header(b"connection") or b"").lower()
    request.keep_alive = b"close" not in connection and (
        request.version == b"HTTP/1.1" or b"keep-alive" in connection)
    if (request.header(b"expect") or b"").lower() == b"100-continue":
        conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.body = await _read_body(conn, request)
    return request


async def _read_body(conn: ClientConn, request: Request) -> bytes:
    if b"chunked" in (request.header(b"transfer-encoding") or b"").lower():
        parts = []
        total = 0
        while True:
            size = int(_chunk_size(await conn.read_line()))
            if size == 0:
                while await conn.read_line():
                    pass  # trailers: dropped
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise BadRequest(413, "request body too large")
            parts.append(await conn.read_exactly(size))
            if await conn.read_exactly(2) != b"\r\n":
                raise BadRequest(400, "bad chunked body")
    length = request.header(b"content-length")
    if length is None:
        return b""
    if not length.isdigit():
        raise BadRequest(400, "bad Content-Length")
    if int(length) > MAX_BODY:
        raise BadRequest(413, "request body too large")
    return await conn.read_exactly(int(length))


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise BadRequest(400, "bad chunk size") from None


def upstream_request(request: Request, host: bytes) -> bytes:
    """The request as sent to the engine: same target and headers, our own framing."""
    out = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
    for name, value in request.headers:
        if name not in HOP_BY_HOP:
            out += (name, b": ", value, b"\r\n")
    if request.header(b"host") is None:
        out += (b"host: ", host, b"\r\n")
    out += (b"content-length: ", str(len(request.body)).encode(), b"\r\n\r\n", request.body)
    return b"".join(out)


def response_bytes(status: int, reason: str, body: bytes, *, content_type: bytes = b"application/json",
                   keep_alive: bool = True, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A whole response the front door answers itself (errors, /v1/models)."""
    head = [f"HTTP/1.1 {status} {reason}\r\n".encode(), b"content-type: ", content_type, b"\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: ", b"keep-alive" if keep_alive else b"close", b"\r\n"]
    for name, value in extra:
        head += (name, b": ", value, b"\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


class ChunkedEnd:
    """Finds where a chunked body ends in bytes relayed as they arrive, without re-framing.

    The relay forwards each read from the engine as is (one SSE event is usually one
    read and one write); this only tracks chunk sizes to know when the last chunk and
    its trailers have passed, so the connection can go back to the pool.
    """

    MAX_LINE = 8192

    def __init__(self) -> None:
        self._need = 0            # bytes of chunk data (+ its CRLF) still to pass
        self._line = bytearray()  # a size or trailer line split across reads
        self._trailers = False

    def feed(self, data: bytes) -> int | None:
        """The offset just past the body's end if it ends in `data`, else None."""
        i, n = 0, len(data)
        while i < n:
            if self._need:
                take = min(self._need, n - i)
                self._need -= take
                i += take
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > self.MAX_LINE:
                    raise ValueError("chunk line too long")
                return None
            self._line += data[i:j]
            i = j + 1
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            if self._trailers:
                if not line:
                    return i
                continue
            size = _chunk_size_or_value_error(line)
            if size == 0:
                self._trailers = True
            else:
                self._need = size + 2
        return None


def _chunk_size_or_value_error(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise ValueError(f"bad chunk size line {line[:40]!r}") from None
