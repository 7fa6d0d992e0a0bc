"""Download one model file over HTTP(S) into the cache: resumable, verified, atomic.

Model files are tens of GB fetched over home and office links, so a download
must survive dropped connections and agent restarts without starting over,
and must never hand llama-server a file that is short, corrupt or not the
one the Model names. The rules:

* Bytes go to `<name>.partial` beside the final path; only a complete,
  verified file is renamed into place (atomically), so a file at the final
  path is always whole. The partial survives restarts.
* Resume sends `Range: bytes=<size>-` (with `If-Range` when the server gave
  a validator) and accepts the continuation only as `206` with a
  `Content-Range` starting exactly there. A `200` means the server ignored
  the range (or the file changed): start again from 0.
* Lengths are cross-checked: the body may not exceed the announced span, and
  every response must agree on the file's total size. A server that changes
  its story is lying or serving a different file; the partial is discarded
  and the download fails rather than splicing two files together.
* SHA-256 is computed while writing (in worker threads, with the bytes of a
  resumed prefix hashed once in a thread before continuing), compared with
  the Model's `sha256` when given, and recorded in a sidecar
  (`<name>.sha256.json`) with the size and mtime, so a restart trusts the
  cached file without re-hashing gigabytes.
* Network failures retry with back-off, keeping the partial; an attempt that
  made progress resets the failure count. Refusals (HTTP 4xx), integrity
  failures and local disk errors are final.
* Where a download may connect and where the token may go are the owner's
  (`core.egress`, enforced by `adapters.egress_http`): public addresses and
  the networks the owner lists, redirects followed hop by hop, the token
  only over https to the origin it is for. How much it may write is the
  owner's too (`core.download_limits`): a known size (or a pinned sha256)
  under a cap, and a free-disk margin checked before and while writing; a
  full disk or a breached margin removes the partial file.

File I/O and hashing run in threads (`asyncio.to_thread`); the event loop
only moves buffers. Nothing here logs request headers: the bearer token
lives in one dict for the duration of one request.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp
import structlog

from metal_agent.adapters.model_cache import (
    CachePaths,
    Verified,
    discard_partial,
    finalize,
    hash_file,
    partial_state,
    PartialSink,
    write_json,
    inspect_cached,
)
from metal_agent.adapters.egress_http import Refused, open_followed
from metal_agent.core.api import SecretRef
from metal_agent.core.backoff import Backoff
from metal_agent.core.download_progress import Progress
from metal_agent.core.download_limits import REASON_DISK, REASON_TOO_LARGE, DownloadLimits, Refusal
from metal_agent.core.egress import REASON_TOKEN_HOST, EgressPolicy
from metal_agent.core.model_urls import redact
from metal_agent.core.status import Blocker

log = structlog.get_logger(__name__)

READ_CHUNK = 1 << 20
WRITE_BATCH = 4 << 20  # hand the writer thread this much at a time
DEFAULT_BACKOFF = Backoff(initial=2.0, factor=2.0, cap=60.0)
DEFAULT_MAX_FAILURES = 5
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)

REASON_FAILED = "ModelDownloadFailed"
REASON_CHECKSUM = "ModelChecksumMismatch"
REASON_LENGTH = "ModelLengthMismatch"

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)
_QUERY = re.compile(r"\?[^\s'\")]*")


# -- credentials ----------------------------------------------------------------


class TokenUnavailable(Exception):
    """The token could not be read; `blocker` says why, for the service's status.

    `retryable` marks failures that may go away on their own (API server
    unreachable), as opposed to a missing Secret or a missing RBAC grant.
    """

    def __init__(self, blocker: Blocker, *, retryable: bool = False) -> None:
        super().__init__(blocker.message)
        self.blocker = blocker
        self.retryable = retryable


TokenProvider = Callable[[str, SecretRef], Awaitable[str | None]]


# -- results and errors -----------------------------------------------------------


class DownloadError(Exception):
    """An attempt failed. `permanent` errors end the download; others are retried.

    `integrity` marks failures about the bytes themselves (length, digest):
    retrying soon would only download the same wrong file again.
    """

    def __init__(self, message: str, *, permanent: bool, reason: str = REASON_FAILED,
                 progressed: bool = False, integrity: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.reason = reason
        self.progressed = progressed
        self.integrity = integrity


async def _in_thread(fn, *args):
    """`asyncio.to_thread`, except that a cancelled caller still waits for the thread,
    so that two operations on the same file never overlap (a write and the close)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


# -- the download ---------------------------------------------------------------------


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """(first, last, total) from `bytes a-b/N` or `bytes */N`; None if malformed."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    first, last, total = match.groups()
    return (int(first) if first else None, int(last) if last else None,
            None if total == "*" else int(total))


def _http_error(status: int, reason: str, where: str, has_token: bool) -> DownloadError:
    text = f"HTTP {status} {reason} from {where}".rstrip()
    if status in (401, 403):
        hint = ("the token from spec.sourceSecretRef was refused" if has_token else
                "the server wants credentials: put a bearer token in a Secret and name it in the Model's spec.sourceSecretRef")
        return DownloadError(f"{text}; {hint}", permanent=True)
    if status in (408, 425, 429) or status >= 500:
        return DownloadError(text, permanent=False)
    return DownloadError(text, permanent=True)


@dataclass
class _Tally:
    bytes: int = 0


class _DiskLow(Exception):
    """Free space fell below the owner's margin while writing (raised in the writer thread)."""

    def __init__(self, free: int) -> None:
        super().__init__(free)
        self.free = free


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class _Writer:
    """Writes batches to the partial (in a thread) and reads free space every `check_every` bytes."""

    def __init__(self, sink: PartialSink, directory, limits: DownloadLimits) -> None:
        self.sink = sink
        self.directory = directory
        self.limits = limits
        self.unchecked = 0

    def write(self, data: bytes) -> None:
        self.sink.write(data)
        self.unchecked += len(data)
        if self.unchecked >= self.limits.check_every:
            self.unchecked = 0
            st = os.statvfs(self.directory)
            free = st.f_bavail * st.f_frsize
            if free < self.limits.free_margin:
                raise _DiskLow(free)


class Download:
    """Fetch `url` to `paths.final`, verifying `expected_sha256` when given. Run with `run()`."""

    def __init__(
        self,
        url: str,
        paths: CachePaths,
        expected_sha256: str | None,
        *,
        session: aiohttp.ClientSession,
        token: Callable[[], Awaitable[str | None]],
        backoff: Backoff = DEFAULT_BACKOFF,
        max_failures: int = DEFAULT_MAX_FAILURES,
        on_update: Callable[[], None] = lambda: None,
        egress: EgressPolicy | None = None,
        limits: DownloadLimits | None = None,
        declared_size: int | None = None,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.paths = paths
        self.expected = expected_sha256
        self.session = session
        self.token = token
        self.egress = egress or EgressPolicy()
        self.limits = limits or DownloadLimits()
        self.declared_size = declared_size  # known beforehand (a hub listing): an upper bound
        self.backoff = backoff
        self.max_failures = max_failures
        self.on_update = on_update
        self.progress = Progress()

    @property
    def message(self) -> str:
        return self.progress.message(self.where)

    def _set(self, **changes) -> None:
        for name, value in changes.items():
            setattr(self.progress, name, value)
        self.on_update()

    async def run(self) -> Verified:
        """The verified file. Raises `DownloadError` (permanent) or `TokenUnavailable`."""
        self._set(phase="checking")
        try:
            cached = await asyncio.to_thread(inspect_cached, self.paths, self.url)
        except OSError as err:
            raise DownloadError(f"cannot read the cached file {self.paths.final}: {err.strerror or err}",
                                permanent=True) from None
        if cached is not None and self.expected in (None, cached.sha256):
            return cached
        failures = 0
        while True:
            try:
                return await self._attempt()
            except TokenUnavailable as err:
                if not err.retryable:
                    raise
                failure = DownloadError(err.blocker.message, permanent=False)
            except DownloadError as err:
                if err.permanent:
                    raise
                failure = err
            except asyncio.TimeoutError:
                failure = DownloadError("timed out reading the token or the cache", permanent=False)
            except OSError as err:
                raise DownloadError(f"model cache {self.paths.directory}: {err.strerror or err}",
                                    permanent=True) from None
            failures = 1 if failure.progressed else failures + 1
            if failures >= self.max_failures:
                raise DownloadError(f"download from {self.where} failed {failures} times in a row; "
                                    f"last error: {failure.message}", permanent=True)
            delay = self.backoff.delay(failures)
            log.warning("model download attempt failed; will retry", url=self.where, error=failure.message,
                        failures=failures, retry_in=round(delay, 2))
            self._set(phase="retrying", error=failure.message, attempt=failures, retry_in=delay)
            await asyncio.sleep(delay)

    async def _attempt(self) -> Verified:
        paths = self.paths
        offset, meta = await asyncio.to_thread(partial_state, paths, self.url)
        known_total = meta.get("total") if meta else None
        self.progress.reset_rate()
        self._set(phase="connecting", done=offset, total=known_total, error=None, retry_in=None)

        headers = {"Accept-Encoding": "identity"}
        token = await self.token()
        if token and (why := self.egress.token_refusal(self.url)) is not None:
            raise DownloadError(f"not downloading {self.where} with the token of spec.sourceSecretRef: {why}",
                                permanent=True, reason=REASON_TOKEN_HOST)
        if offset:
            headers["Range"] = f"bytes={offset}-"
            etag = (meta or {}).get("etag")
            validator = etag if etag and not etag.startswith("W/") else (meta or {}).get("last_modified")
            if validator:
                headers["If-Range"] = validator

        got = _Tally()
        try:
            async with open_followed(self.session, self.url, headers, token, self.egress) as (resp, _):
                start, total, span = await self._accept(resp, offset, known_total, bool(token))
                if start is None:  # 416 on resume: the partial already holds the whole file
                    return await self._complete(offset, total)
                limit = self.limits.file_limit(self.where, total, self.declared_size, self.expected is not None)
                if isinstance(limit, Refusal):
                    await asyncio.to_thread(discard_partial, paths)
                    raise DownloadError(limit.message, permanent=True, reason=limit.reason)
                await self._check_disk(total, start)
                if start == 0:
                    await asyncio.to_thread(write_json, paths.partial_meta, {
                        "url": self.url, "total": total,
                        "etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified"),
                    })
                digest, end = await self._stream(resp, start, total, span, got, limit)
        except Refused as err:
            await asyncio.to_thread(discard_partial, paths)
            raise DownloadError(f"{self.where}: {err.message}; nothing was stored", permanent=True,
                                reason=err.reason) from None
        except _DiskLow as err:
            await asyncio.to_thread(discard_partial, paths)
            raise DownloadError(self.limits.disk_message(str(paths.directory), err.free, None), permanent=True,
                                reason=REASON_DISK) from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            # aiohttp's text may quote a redirect target; its query can be a signature.
            detail = _QUERY.sub("?…", str(err)) or type(err).__name__
            raise DownloadError(f"connection to {self.where} failed: {detail}",
                                permanent=False, progressed=got.bytes > 0) from None
        except OSError as err:
            if err.errno in _DISK_FULL:
                await asyncio.to_thread(discard_partial, paths)
                raise DownloadError(f"the disk holding {paths.directory} is full ({err.strerror}); the partial "
                                    "file was removed", permanent=True, reason=REASON_DISK) from None
            raise DownloadError(f"cannot write {paths.partial}: {err.strerror or err}", permanent=True) from None
        if total is not None and end < total:
            # A server may answer a range with less than asked; ask for the rest.
            raise DownloadError(f"{self.where} sent bytes up to {end} of {total}; continuing",
                                permanent=False, progressed=True)
        return await self._verify_and_finalize(digest)

    async def _accept(self, resp: aiohttp.ClientResponse, offset: int, known_total: int | None,
                      has_token: bool) -> tuple[int | None, int | None, int | None]:
        """Check the response; (where its body starts, file total, body span).

        start None: nothing to fetch, the partial is complete (416 on resume).
        """
        if resp.status == 416 and offset:
            cr = _content_range(resp.headers.get("Content-Range"))
            remote = cr[2] if cr else None
            if remote is not None and known_total is not None and remote != known_total:
                await self._length_lie(f"{self.where} first announced {known_total} bytes, now {remote}")
            if remote == offset:
                return None, remote, None
            await asyncio.to_thread(discard_partial, self.paths)
            raise DownloadError(f"{self.where} refused to resume at byte {offset}; starting over", permanent=False)
        if resp.status >= 300:
            raise _http_error(resp.status, resp.reason or "", self.where, has_token)
        if resp.status == 206:
            cr = _content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] is None:
                await self._length_lie(f"{self.where} answered 206 without a usable Content-Range")
            first, last, total = cr
            if first != offset:
                await self._length_lie(f"{self.where} resumed at byte {first} instead of {offset}")
            if last < first or (total is not None and last >= total):
                await self._length_lie(f"{self.where} sent an impossible range {first}-{last}/{total}")
            if known_total is not None and total is not None and total != known_total:
                await self._length_lie(f"{self.where} first announced {known_total} bytes, now {total}")
            span = last - first + 1
            if resp.content_length is not None and resp.content_length != span:
                await self._length_lie(f"{self.where} sent Content-Length {resp.content_length} "
                                       f"for a {span}-byte range")
            return first, total if total is not None else known_total, span
        if resp.status != 200:
            raise DownloadError(f"unexpected HTTP {resp.status} from {self.where}", permanent=True)
        if offset:
            log.info("server ignored the range request or the file changed; downloading from the start",
                     url=self.where, had=offset)
        return 0, resp.content_length, resp.content_length

    async def _length_lie(self, what: str) -> None:
        await asyncio.to_thread(discard_partial, self.paths)
        raise DownloadError(f"inconsistent length: {what}; the partial download was discarded",
                            permanent=True, reason=REASON_LENGTH, integrity=True)

    async def _check_disk(self, total: int | None, start: int) -> None:
        """The rest of the file fits with the owner's margin to spare (of unknown size: the margin is there)."""
        free = (await asyncio.to_thread(shutil.disk_usage, self.paths.directory)).free
        refusal = self.limits.space_refusal(str(self.paths.directory), free,
                                            max(total - start, 0) if total is not None else 0)
        if refusal is not None:
            await asyncio.to_thread(discard_partial, self.paths)
            raise DownloadError(refusal.message, permanent=True, reason=refusal.reason)

    async def _stream(self, resp: aiohttp.ClientResponse, start: int, total: int | None,
                      span: int | None, got: _Tally, limit: int) -> tuple[str, int]:
        """Append the body to the partial: (sha256 of the whole partial, its size)."""
        paths = self.paths
        if start:
            self._set(phase="hashing", done=start, total=total)
            hasher, have = await asyncio.to_thread(hash_file, paths.partial, start)
            if have != start:
                raise DownloadError("the partial file shrank while resuming", permanent=False)
        else:
            hasher = hashlib.sha256()
        sink = await _in_thread(PartialSink, paths.partial, start, hasher)
        writer = _Writer(sink, paths.directory, self.limits)
        buffer: list[bytes] = []
        buffered = 0
        overflow: str | None = None
        too_large = False
        self._set(phase="downloading", done=start, total=total)
        try:
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                got.bytes += len(chunk)
                if span is not None and got.bytes > span:
                    overflow = f"{self.where} sent more than the {span} bytes it announced"
                    break
                if total is not None and start + got.bytes > total:
                    overflow = f"{self.where} sent more than the {total} bytes the file has"
                    break
                if start + got.bytes > limit:
                    too_large = total is None and limit == self.limits.max_size  # else a listing's size: a lie
                    overflow = (f"{self.where} sent more than {limit} bytes, the most this file may have"
                                + (" (--max-download-size)" if too_large else ""))
                    break
                buffer.append(chunk)
                buffered += len(chunk)
                if buffered >= WRITE_BATCH:
                    batch, buffer, buffered = b"".join(buffer), [], 0
                    await _in_thread(writer.write, batch)
                self.progress.advance(start + got.bytes, time.monotonic())
                self.on_update()
        finally:
            # Whatever arrived before a dropped connection is a valid prefix: keep it.
            try:
                if overflow is None and buffer:
                    await _in_thread(writer.write, b"".join(buffer))
            finally:
                await _in_thread(sink.close, overflow is None and total is not None and sink.size == total)
        if too_large:
            await asyncio.to_thread(discard_partial, self.paths)
            raise DownloadError(f"{overflow}; the partial file was removed", permanent=True, reason=REASON_TOO_LARGE)
        if overflow is not None:
            await self._length_lie(overflow)
        if span is not None and got.bytes < span:
            raise DownloadError(f"{self.where} ended the response after {got.bytes} of {span} bytes",
                                permanent=False, progressed=got.bytes > 0)
        return hasher.hexdigest(), sink.size

    async def _complete(self, size: int, total: int | None) -> Verified:
        """The partial already holds the whole file (resume answered 416 at its end)."""
        self._set(phase="hashing", done=size, total=total)
        hasher, _ = await asyncio.to_thread(hash_file, self.paths.partial)
        return await self._verify_and_finalize(hasher.hexdigest())

    async def _verify_and_finalize(self, digest: str) -> Verified:
        if self.expected is not None and digest != self.expected:
            await asyncio.to_thread(discard_partial, self.paths)
            raise DownloadError(f"sha256 mismatch for {self.where}: the Model expects {self.expected}, "
                                f"the downloaded file has {digest}; the file was removed",
                                permanent=True, reason=REASON_CHECKSUM, integrity=True)
        verified = await asyncio.to_thread(finalize, self.paths, self.url, digest)
        log.info("model downloaded", url=self.where, path=str(verified.path), size=verified.size, sha256=digest)
        return verified
