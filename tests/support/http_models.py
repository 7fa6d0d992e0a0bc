"""A real HTTP server on 127.0.0.1 that serves model bytes and misbehaves on cue.

Downloads are tested against real sockets and real bytes, not a mocked
client: the server is aiohttp's, the misbehaviours are the ones model hosts
and flaky links actually produce (connections dropped mid-file, a length
that turns out to be false, a range request answered with too much, a slow
trickle, a token requirement). Every request is recorded so tests can
assert what the client sent (Range, If-Range, Authorization).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

_RANGE = re.compile(r"^bytes=(\d+)-$")


def model_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes standing in for a model file."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    path: str
    range: str | None
    if_range: str | None
    authorization: str | None


@dataclass
class Served:
    """One file and how the server misbehaves when serving it.

    drop_after: per response, in order, how many body bytes to send before
        cutting the connection (consumed one per response; then behave).
    lie_extra: full responses announce this many bytes more than exist,
        send what exists and cut the connection.
    overflow_on_range: ranged responses are chunked and carry this many bytes
        more than their Content-Range says.
    honour_range: answer Range with 206 (else ignore it and send 200).
    trickle: (bytes per write, seconds between writes) to make a slow server.
    token: required bearer token (401 without it).
    gate: responses wait for this event before sending headers.
    etag: sent as ETag (If-Range is honoured against it).
    fail_with: per request, in order, an HTTP status to answer with instead
        (consumed one per request; then behave).
    chunked: send the body chunked, with no Content-Length (the size is unknown to the client).
    endless: with chunked, keep sending `data` over and over until the client goes away
        (or `ENDLESS_CAP` bytes): a server that would fill the disk.
    """

    data: bytes
    drop_after: list[int] = field(default_factory=list)
    lie_extra: int = 0
    overflow_on_range: int = 0
    honour_range: bool = True
    trickle: tuple[int, float] | None = None
    token: str | None = None
    gate: asyncio.Event | None = None
    etag: str | None = None
    fail_with: list[int] = field(default_factory=list)
    chunked: bool = False
    endless: bool = False


ENDLESS_CAP = 1 << 30


class ModelHTTPServer:
    """`host`: the address to listen on (any 127.x works without setup); `tls`: serve https
    with this server context (see `tls_pair`)."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.host = host
        self.tls = tls
        self.redirects: dict[str, tuple[int, str]] = {}
        self.files: dict[str, Served] = {}
        self.requests: list[Seen] = []
        self.responses_started = 0
        self.body_bytes_sent = 0
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> ModelHTTPServer:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add(self, path: str, data: bytes, **behaviour) -> str:
        self.files[path] = Served(data, **behaviour)
        return self.url(path)

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """Answer `path` with a redirect to `location`; returns the URL of `path`."""
        self.redirects[path] = (status, location)
        return self.url(path)

    def requests_for(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        served = self.files.get(request.path)
        self.requests.append(Seen(request.path, request.headers.get("Range"), request.headers.get("If-Range"),
                                  request.headers.get("Authorization")))
        if request.path in self.redirects:
            status, location = self.redirects[request.path]
            return web.Response(status=status, headers={"Location": location})
        if served is None:
            return web.Response(status=404, text="no such model")
        if served.token is not None and request.headers.get("Authorization") != f"Bearer {served.token}":
            return web.Response(status=401, text="token required")
        if served.fail_with:
            return web.Response(status=served.fail_with.pop(0), text="scripted failure")
        if served.gate is not None:
            await served.gate.wait()

        data = served.data
        start, status = 0, 200
        match = _RANGE.match(request.headers.get("Range", ""))
        if_range = request.headers.get("If-Range")
        range_applies = match and served.honour_range and (if_range is None or if_range == served.etag)
        if range_applies:
            start = int(match.group(1))
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206

        body = data[start:]
        resp = web.StreamResponse(status=status)
        if served.etag:
            resp.headers["ETag"] = served.etag
        drop = served.drop_after.pop(0) if served.drop_after else None
        if served.chunked:
            resp.enable_chunked_encoding()
        elif status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if served.overflow_on_range:
                resp.enable_chunked_encoding()
                body += model_bytes(served.overflow_on_range, seed=99)
            else:
                resp.content_length = len(body)
        else:
            resp.content_length = len(body) + served.lie_extra
            if served.lie_extra:
                drop = len(body)
        await resp.prepare(request)
        self.responses_started += 1

        to_send = body if drop is None else body[:drop]
        step, pause = served.trickle or (256 * 1024, 0.0)
        try:
            while True:
                for i in range(0, len(to_send), step):
                    await resp.write(to_send[i:i + step])
                    self.body_bytes_sent += len(to_send[i:i + step])
                    if pause:
                        await asyncio.sleep(pause)
                if not (served.endless and served.chunked) or self.body_bytes_sent >= ENDLESS_CAP:
                    break
        except (ConnectionResetError, ConnectionError):  # the client went away mid-body (e.g. a killed agent)
            return resp
        if drop is not None:
            request.transport.close()  # cut the connection mid-body
            return resp
        await resp.write_eof()
        return resp


def git_blob_id(data: bytes) -> str:
    """The hub's `blobId` of a file kept in git (not LFS): git's blob sha1."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_hub_repo(server: ModelHTTPServer, repo: str, files: dict[str, bytes], *, revision: str = "main",
                 commit: str = "c0ffee" * 6 + "abcd", lfs: tuple[str, ...] = (), lie: dict[str, dict] | None = None,
                 per_file: dict[str, dict] | None = None, **behaviour) -> str:
    """Publish `files` as hub repository `repo` at `revision`, the way the hub's API and
    resolve URLs answer: `/api/models/<repo>/revision/<rev>` lists every file with its size
    (LFS files with their sha256, the others with their git blob id), and
    `/<repo>/resolve/<commit>/<path>` serves the bytes. `behaviour` (drop_after, token, gate, ...)
    applies to every file, `per_file` to one; `lie` overrides listing fields per file. Returns the commit."""
    siblings = []
    for path, data in files.items():
        entry: dict = {"rfilename": path, "size": len(data)}
        if path in lfs:
            entry["lfs"] = {"sha256": sha256(data), "size": len(data)}
        else:
            entry["blobId"] = git_blob_id(data)
        entry.update((lie or {}).get(path, {}))
        siblings.append(entry)
        served = {k: (list(v) if isinstance(v, list) else v) for k, v in behaviour.items()}
        served.update((per_file or {}).get(path, {}))
        server.add(f"/{repo}/resolve/{commit}/{path}", data, **served)
    listing = json.dumps({"id": repo, "sha": commit, "siblings": siblings}).encode()
    token = behaviour.get("token")
    server.add(f"/api/models/{repo}/revision/{revision}", listing, **({"token": token} if token else {}))
    return commit


def tls_pair(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) from a fresh test CA, for https model servers."""
    from tests.support.pki import TestPKI

    pki = TestPKI(directory)
    pair = pki.serving("models", hosts)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pair.cert, pair.key)
    client = ssl.create_default_context(cafile=str(pki.ca_cert))
    return server, client
