"""What a response says it cost: its `usage` token counts, read off the bytes being relayed.

The relay forwards each read from the engine as it comes; this is handed the same
bytes and must not slow them down (issue 21: <= 0.3 ms p50 added per request). So
nothing is parsed while the body flows: the scanner only strips the chunked framing
and keeps the last `TAIL` bytes of the payload (the whole of a small JSON body). The
parse happens once, after the last byte has gone to the client.

Where the counts are, by engine (checked against their sources and real runs):
- a JSON completion (both engines): `usage` in the body;
- a llama-server stream: the last event carries `timings` (prompt_n + cache_n, predicted_n),
  and a `usage` event too when the client asked (`stream_options.include_usage`);
- an mlx_lm.server stream: a final `usage` event only when the client asked for it
  (`stream_options.include_usage`); otherwise the response carries no counts and is
  counted as such (`usage_missing`), never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: Bytes of payload kept: the final usage event (a few hundred bytes) and then some.
TAIL = 16 * 1024
#: A JSON body up to this size is kept whole and parsed whole.
WHOLE_JSON = 256 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def _count(obj: object, name: str) -> int | None:
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_of(obj: object) -> Usage | None:
    """The counts in one decoded response or event: OpenAI's `usage`, else llama-server's `timings`."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
    if prompt is not None and (completion is not None or "completion_tokens" not in usage):
        return Usage(prompt, completion or 0)  # embeddings state prompt tokens only
    # llama-server's own counts, in every answer and a stream's last event (its `usage` there
    # only with stream_options.include_usage): prompt_n is what it processed, cache_n what it
    # reused, together the prompt (as usage.prompt_tokens says, checked on build 11434).
    timings = obj.get("timings")
    prompt, completion = _count(timings, "prompt_n"), _count(timings, "predicted_n")
    if prompt is not None and completion is not None:
        return Usage(prompt + (_count(timings, "cache_n") or 0), completion)
    return None


def last_event_usage(payload: bytes) -> Usage | None:
    """The last server-sent event in `payload` that carries counts (events are read backwards,
    so a long stream costs only its last few events)."""
    end = len(payload)
    while end > 0:
        start = payload.rfind(b"\n\n", 0, end - 1)
        event = payload[start + 2 if start >= 0 else 0:end]
        end = start if start >= 0 else 0
        if b'"usage"' not in event and b'"timings"' not in event:
            continue
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    found = usage_of(json.loads(line[5:]))
                except ValueError:
                    found = None
                if found is not None:
                    return found
    return None


_DECODER = json.JSONDecoder()


def _object_after(body: bytes, key: bytes) -> object:
    """The JSON object that follows the last `key` in `body` (None if there is none): the
    counts are a small object, so only it is decoded, not the whole answer."""
    at = body.rfind(key)
    start = body.find(b"{", at + len(key)) if at >= 0 else -1
    if start < 0 or body[at + len(key):start].strip() != b":":
        return None
    try:
        found, _ = _DECODER.raw_decode(body[start:start + 4096].decode("utf-8", "replace"))
    except ValueError:
        return None
    return found


def tail_usage(tail: bytes) -> Usage | None:
    """The counts in a JSON answer, read from its `usage` (or llama-server's `timings`) object
    alone: a whole body need not be parsed, and a body too big to keep whole (a large embeddings
    answer) still has its usage in its tail."""
    usage = _object_after(tail, b'"usage"')
    if usage is not None:
        found = usage_of({"usage": usage})
        if found is not None:
            return found
    timings = _object_after(tail, b'"timings"')
    return usage_of({"timings": timings}) if timings is not None else None


class Dechunk:
    """Strips HTTP/1.1 chunked framing from bytes fed in arbitrary pieces (the relay has
    already checked the framing; bad framing simply ends the payload here)."""

    __slots__ = ("_need", "_line", "_done")

    def __init__(self) -> None:
        self._need = 0            # payload bytes left in the current chunk
        self._line = b""          # a size line split across pieces
        self._done = False

    def feed(self, data: bytes) -> bytes:
        out = []
        i, n = 0, len(data)
        while i < n and not self._done:
            if self._need > 0:
                take = min(self._need, n - i)
                out.append(data[i:i + take])
                self._need -= take
                i += take
                if self._need == 0:
                    self._need = -2  # the CRLF after the chunk's data
                continue
            if self._need < 0:
                skip = min(-self._need, n - i)
                self._need += skip
                i += skip
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line = (self._line + data[i:])[-64:]
                break
            line, self._line = self._line + data[i:j], b""
            i = j + 1
            try:
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
            except ValueError:
                self._done = True
                break
            if size == 0:
                self._done = True
            self._need = size
        return b"".join(out) if len(out) != 1 else out[0]


class UsageScan:
    """One response's body, as relayed: `feed` each piece, `result()` once it has ended."""

    __slots__ = ("stream", "_dechunk", "_kept", "_size", "_total")

    def __init__(self, *, chunked: bool, stream: bool) -> None:
        self.stream = stream
        self._dechunk = Dechunk() if chunked else None
        self._kept: list[bytes] = []
        self._size = 0
        self._total = 0

    def feed(self, data: bytes) -> None:
        if self._dechunk is not None:
            data = self._dechunk.feed(data)
        if not data:
            return
        self._total += len(data)
        self._kept.append(data)
        self._size += len(data)
        if self._size > 2 * (TAIL if self.stream or self._total > WHOLE_JSON else WHOLE_JSON):
            # keep the tail bounded: one join per TAIL bytes streamed
            joined = b"".join(self._kept)[-TAIL:]
            self._kept, self._size = [joined], len(joined)

    def result(self) -> Usage | None:
        payload = b"".join(self._kept)
        if self.stream:
            return last_event_usage(payload)
        return tail_usage(payload) if payload else None
