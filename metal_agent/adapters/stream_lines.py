"""Text lines from a subprocess's pipe, without asyncio.StreamReader's 64 KiB line limit.

Why: `StreamReader.readline` raises on a longer line and leaves the stream
unusable; a tool that prints one garbage line (powermetrics, on a bad
day) must cost that line, not the reader.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import structlog

log = structlog.get_logger(__name__)

READ_CHUNK = 64 * 1024
# A powermetrics line is a few KB at most; a megabyte means garbage, not data.
MAX_LINE = 1024 * 1024


async def read_lines(stream: asyncio.StreamReader, max_line: int = MAX_LINE) -> AsyncIterator[str]:
    """Split a byte stream into text lines; a line longer than `max_line` is dropped whole
    (it cannot be data we read) rather than ending the stream."""
    buf = bytearray()
    skipping = False
    while chunk := await stream.read(READ_CHUNK):
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if not skipping:
                yield buf[start:end].decode("utf-8", errors="replace")
            skipping = False
            start = end + 1
        del buf[:start]
        if len(buf) > max_line:
            if not skipping:
                log.warning("dropping an over-long line", limit_bytes=max_line)
            buf.clear()
            skipping = True
    if buf and not skipping:
        yield buf.decode("utf-8", errors="replace")


async def collect_tail(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    """The non-blank lines of `stream`, into `tail` (a bounded deque keeps the last ones)."""
    async for line in read_lines(stream):
        if line.strip():
            tail.append(line.rstrip())
