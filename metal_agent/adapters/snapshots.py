"""Download a whole hub repository (an MLX model directory) into the cache, with the GGUF guarantees.

An MLX model is a directory (config.json, safetensors shards, tokenizer
files), named on the hub as `hf://org/repo[@revision]`. It is fetched with
the same rules as one GGUF file (`adapters.downloads`), file by file, by
that very `Download` class:

* The revision is resolved once to a commit through the hub's API
  (`/api/models/<org>/<repo>/revision/<rev>?blobs=true`), which lists every
  file with its size and, for LFS files, its sha256; every file is then
  fetched from that commit, so a branch that moves mid-download cannot mix
  two snapshots.
* Files land in `<repo>.partial/` beside the final directory, each resumable
  (`Range`) and verified: its size against the listing, its sha256 against
  the listing's LFS hash, or, for small files kept in git, its git blob id.
  Only a complete, verified directory is renamed into place (atomically),
  marked by `.metal-agent-snapshot.json` naming the commit, so a directory
  at the final path is always whole; a restart trusts it without a request.
* Progress counts the bytes of the whole snapshot; failures, retries,
  tokens (`sourceSecretRef`) and sharing between services are the model
  store's, exactly as for a single file.
* The listing and every file go through the same egress rules (addresses,
  redirects, token origin) and size limits; each file's listed size bounds
  its body. A file that finds the disk full (or the margin reached) removes
  the whole staging directory, not only its own partial.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Awaitable, Callable
from urllib.parse import quote

import aiohttp
import structlog

from metal_agent.adapters.downloads import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_FAILURES,
    REASON_LENGTH,
    Download,
    DownloadError,
    _http_error,
)
from metal_agent.adapters.egress_http import Refused, open_followed
from metal_agent.adapters.model_cache import CachePaths, Verified, read_json, write_json
from metal_agent.core.api import ModelSource
from metal_agent.core.backoff import Backoff
from metal_agent.core.download_limits import REASON_DISK, DownloadLimits
from metal_agent.core.download_progress import Progress, human_size
from metal_agent.core.model_urls import redact
from metal_agent.core.egress import REASON_TOKEN_HOST, EgressPolicy
from metal_agent.core.status import Blocker

log = structlog.get_logger(__name__)

MARKER = ".metal-agent-snapshot.json"
MAX_LISTING_BYTES = 16 << 20


@dataclass(frozen=True)
class HubRepo:
    """`hf://org/repo[@revision]`, resolved against a hub endpoint."""

    endpoint: str
    repo: str  # org/name
    revision: str

    @property
    def listing_url(self) -> str:
        return f"{self.endpoint}/api/models/{self.repo}/revision/{quote(self.revision, safe='')}?blobs=true"

    def file_url(self, commit: str, path: str) -> str:
        return f"{self.endpoint}/{self.repo}/resolve/{commit}/{quote(path)}"

    @property
    def key(self) -> str:
        """What the cache directory is keyed by (the revision as written, like a URL)."""
        return f"{self.endpoint}/{self.repo}@{self.revision}"


def resolve_repo(source: ModelSource, endpoint: str) -> HubRepo | Blocker:
    rest = source.raw.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0].strip("/")
    parts = [p for p in rest.split("/") if p]
    if len(parts) != 2:
        return Blocker("ModelSourceInvalid", f"source {source.raw!r}: an MLX model from the hub is a whole"
                       " repository, hf://org/repo[@revision]")
    org, name = parts
    revision = "main"
    if "@" in name:
        name, revision = name.split("@", 1)
        if not name or not revision:
            return Blocker("ModelSourceInvalid", f"source {source.raw!r}: write a revision as hf://org/repo@revision")
    return HubRepo(endpoint.rstrip("/"), f"{org}/{name}", revision)


def snapshot_paths(cache_dir: Path, repo: HubRepo) -> CachePaths:
    digest = hashlib.sha256(repo.key.encode()).hexdigest()[:16]
    return CachePaths(cache_dir / digest / repo.repo.split("/", 1)[1])


def cached_snapshot(final: Path) -> Verified | None:
    """The complete directory at `final`, or None (blocking: call in a thread)."""
    marker = read_json(final / MARKER)
    if marker is None or not isinstance(marker.get("commit"), str):
        return None
    st = final.stat()
    return Verified(final, st.st_size, st.st_mtime_ns, marker["commit"])


@dataclass(frozen=True)
class _File:
    path: str
    size: int | None
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 of files kept in git


def _safe_relative(path: str) -> bool:
    p = PurePosixPath(path)
    return (bool(path) and not p.is_absolute() and ".." not in p.parts and "\\" not in path and "\0" not in path
            and p.name != MARKER)


def _parse_listing(data: bytes, where: str) -> tuple[str, list[_File]]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("sha"), str) or not isinstance(doc.get("siblings"), list):
        raise DownloadError(f"{where} did not answer with a repository listing (sha, siblings)", permanent=True)
    files = []
    for item in doc["siblings"]:
        name = item.get("rfilename") if isinstance(item, dict) else None
        if not isinstance(name, str) or not _safe_relative(name):
            raise DownloadError(f"{where} lists an unusable file name {name!r}", permanent=True)
        lfs = item.get("lfs") if isinstance(item.get("lfs"), dict) else {}
        size = lfs.get("size", item.get("size"))
        sha = lfs.get("sha256")
        blob = item.get("blobId") if not lfs else None
        files.append(_File(name, size if isinstance(size, int) and size >= 0 else None,
                           sha.lower() if isinstance(sha, str) and len(sha) == 64 else None,
                           blob if isinstance(blob, str) and len(blob) == 40 else None))
    if not files:
        raise DownloadError(f"{where} lists no files", permanent=True)
    return doc["sha"], files


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class SnapshotDownload:
    """Fetch a whole repository to `paths.final` (a directory). Run with `run()`; same face as `Download`."""

    def __init__(
        self,
        repo: HubRepo,
        paths: CachePaths,
        *,
        session: aiohttp.ClientSession,
        token: Callable[[], Awaitable[str | None]],
        backoff: Backoff = DEFAULT_BACKOFF,
        max_failures: int = DEFAULT_MAX_FAILURES,
        on_update: Callable[[], None] = lambda: None,
        egress: EgressPolicy | None = None,
        limits: DownloadLimits | None = None,
    ) -> None:
        self.egress = egress or EgressPolicy()
        self.limits = limits or DownloadLimits()
        self.repo = repo
        self.where = redact(f"{repo.endpoint}/{repo.repo}")
        self.paths = paths
        self.session = session
        self.token = token
        self.backoff = backoff
        self.max_failures = max_failures
        self.on_update = on_update
        self.progress = Progress()
        self.files_done = 0
        self.files_total = 0
        self._current: Download | None = None
        self._bytes_before = 0

    @property
    def staging(self) -> Path:
        return self.paths.final.with_name(self.paths.final.name + ".partial")

    @property
    def message(self) -> str:
        current = self._current
        if current is not None and current.progress.phase in ("retrying", "hashing"):
            return current.message
        if self.progress.phase == "downloading":
            rate = f" at {human_size(current.progress.rate)}/s" if current and current.progress.rate else ""
            return (f"downloading file {min(self.files_done + 1, self.files_total)}/{self.files_total} of "
                    f"{self.progress.amount()}{rate} from {self.where}")
        return self.progress.message(self.where)

    def _file_update(self) -> None:
        current = self._current
        if current is not None:
            self.progress.done = self._bytes_before + current.progress.done
        self.on_update()

    async def run(self) -> Verified:
        cached = await asyncio.to_thread(cached_snapshot, self.paths.final)
        if cached is not None:
            return cached
        self.progress.phase = "connecting"
        self.on_update()
        commit, files = await self._listing()
        self.files_total = len(files)
        self.progress.total = sum(f.size or 0 for f in files) or None
        self.progress.phase = "downloading"
        for item in files:
            target = CachePaths(self.staging / item.path)
            await asyncio.to_thread(self._drop_stale, item, target)
            self._current = Download(self.repo.file_url(commit, item.path), target, item.sha256,
                                     session=self.session, token=self.token, backoff=self.backoff,
                                     max_failures=self.max_failures, on_update=self._file_update,
                                     egress=self.egress, limits=self.limits, declared_size=item.size)
            try:
                verified = await self._current.run()
            except DownloadError as err:
                if err.reason == REASON_DISK:  # the files already fetched give their space back too
                    await asyncio.to_thread(shutil.rmtree, self.staging, True)
                    raise DownloadError(f"{err.message}, and so were the snapshot's other files", permanent=True,
                                        reason=REASON_DISK) from None
                raise
            await self._check(item, verified)
            self._bytes_before += verified.size
            self.files_done += 1
            self.progress.done = self._bytes_before
            self.on_update()
        self._current = None
        verified = await asyncio.to_thread(self._finalize, commit, [f.path for f in files])
        log.info("model snapshot downloaded", repo=self.repo.repo, revision=self.repo.revision, commit=commit,
                 files=len(files), path=str(self.paths.final))
        return verified

    async def _check(self, item: _File, verified: Verified) -> None:
        problem = None
        if item.size is not None and verified.size != item.size:
            problem = f"{item.path} has {verified.size} bytes, the hub lists {item.size}"
        elif item.blob_id is not None and await asyncio.to_thread(_git_blob_id, verified.path) != item.blob_id:
            problem = f"{item.path} does not match the git blob id the hub lists"
        if problem is not None:
            await asyncio.to_thread(self._discard, verified.path)
            raise DownloadError(f"snapshot of {self.where}: {problem}; the file was removed", permanent=True,
                                reason=REASON_LENGTH, integrity=True)

    @staticmethod
    def _drop_stale(item: _File, target: CachePaths) -> None:
        """A file finished by an earlier attempt that is not the one listed now (the revision
        moved on since) is fetched again rather than failed as corrupt."""
        try:
            size = target.final.stat().st_size
        except FileNotFoundError:
            return
        if (item.size is not None and size != item.size) or (
                item.blob_id is not None and _git_blob_id(target.final) != item.blob_id):
            SnapshotDownload._discard(target.final)

    @staticmethod
    def _discard(path: Path) -> None:
        path.unlink(missing_ok=True)
        CachePaths(path).sidecar.unlink(missing_ok=True)

    async def _listing(self) -> tuple[str, list[_File]]:
        failures = 0
        while True:
            try:
                headers = {"Accept": "application/json"}
                token = await self.token()
                if token and (why := self.egress.token_refusal(self.repo.listing_url)) is not None:
                    raise DownloadError(f"not listing {self.where} with the token of spec.sourceSecretRef: {why}",
                                        permanent=True, reason=REASON_TOKEN_HOST)
                async with open_followed(self.session, self.repo.listing_url, headers, token,
                                         self.egress) as (resp, _):
                    if resp.status == 404:
                        raise DownloadError(f"{self.where} has no revision {self.repo.revision!r} (HTTP 404): check"
                                            " the repository name and revision, or the token for a private one",
                                            permanent=True)
                    if resp.status != 200:
                        raise _http_error(resp.status, resp.reason or "", self.where, bool(token))
                    data = await resp.content.read(MAX_LISTING_BYTES + 1)
                if len(data) > MAX_LISTING_BYTES:
                    raise DownloadError(f"{self.where}: the repository listing is implausibly large", permanent=True)
                return _parse_listing(data, self.where)
            except Refused as err:
                raise DownloadError(f"{self.where}: {err.message}; nothing was stored", permanent=True,
                                    reason=err.reason) from None
            except DownloadError as err:
                if err.permanent:
                    raise
                failure = err.message
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                failure = f"connection to {self.where} failed: {type(err).__name__}"
            failures += 1
            if failures >= self.max_failures:
                raise DownloadError(f"listing {self.where} failed {failures} times in a row; last error: {failure}",
                                    permanent=True)
            delay = self.backoff.delay(failures)
            self.progress.phase, self.progress.error, self.progress.attempt, self.progress.retry_in = \
                "retrying", failure, failures, delay
            self.on_update()
            await asyncio.sleep(delay)

    def _finalize(self, commit: str, names: list[str]) -> Verified:
        write_json(self.staging / MARKER, {"commit": commit, "repo": self.repo.repo, "revision": self.repo.revision,
                                           "files": names})
        final = self.paths.final
        if final.exists():  # a complete snapshot cannot be here (run() returned it); a stray one is replaced
            shutil.rmtree(final)
        os.replace(self.staging, final)
        st = final.stat()
        return Verified(final, st.st_size, st.st_mtime_ns, commit)
