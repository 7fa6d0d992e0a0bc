"""The model cache on disk: where a download's files live and what state they are in.

Everything here runs in worker threads (hashing gigabytes, fsync, renames);
the transfer logic in `downloads` calls it through `asyncio.to_thread`. The
layout, per model URL:

* `<cache>/<sha256(url)[:16]>/<file>`: the verified file, only ever renamed
  into place whole;
* `<file>.partial` + `<file>.partial.json`: an unfinished download and the
  URL/validator it belongs to, kept across agent restarts for resuming;
* `<file>.sha256.json`: the digest of the final file with its size and
  mtime, so a restart trusts it without re-hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

HASH_BLOCK = 8 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class CachePaths:
    """Files of one cached download. The directory is keyed by the URL, so two
    Models whose URLs end in the same file name never share a file."""

    final: Path

    @classmethod
    def for_url(cls, cache_dir: Path, url: str, file_name: str) -> CachePaths:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return cls(cache_dir / digest / file_name)

    @property
    def directory(self) -> Path:
        return self.final.parent

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    @property
    def partial_meta(self) -> Path:
        return self.final.with_name(self.final.name + ".partial.json")

    @property
    def sidecar(self) -> Path:
        return self.final.with_name(self.final.name + ".sha256.json")


def safe_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


@dataclass(frozen=True, slots=True)
class Verified:
    """A complete file at its final path, with the digest of its bytes."""

    path: Path
    size: int
    mtime_ns: int
    sha256: str


def hash_file(path: Path, limit: int | None = None) -> tuple[hashlib._Hash, int]:
    """SHA-256 of the first `limit` bytes (all if None), and how many were read."""
    h = hashlib.sha256()
    read = 0
    with path.open("rb") as f:
        while limit is None or read < limit:
            block = f.read(HASH_BLOCK if limit is None else min(HASH_BLOCK, limit - read))
            if not block:
                break
            h.update(block)
            read += len(block)
    return h, read


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def inspect_cached(paths: CachePaths, url: str) -> Verified | None:
    """The file at the final path with its digest, or None if there is none.

    The sidecar is trusted when size and mtime still match; otherwise (a
    crash between rename and sidecar, or a file put there by hand) the file
    is hashed once and the sidecar written.
    """
    try:
        st = paths.final.stat()
    except FileNotFoundError:
        return None
    side = read_json(paths.sidecar)
    if (side and side.get("size") == st.st_size and side.get("mtime_ns") == st.st_mtime_ns
            and isinstance(side.get("sha256"), str) and _HEX64.match(side["sha256"])):
        return Verified(paths.final, st.st_size, st.st_mtime_ns, side["sha256"])
    h, _ = hash_file(paths.final)
    st = paths.final.stat()
    write_json(paths.sidecar, {"sha256": h.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "url": url})
    return Verified(paths.final, st.st_size, st.st_mtime_ns, h.hexdigest())


def partial_state(paths: CachePaths, url: str) -> tuple[int, dict | None]:
    """(bytes already in the partial, its metadata) — a partial of another URL is dropped."""
    paths.directory.mkdir(parents=True, exist_ok=True)
    try:
        size = paths.partial.stat().st_size
    except FileNotFoundError:
        return 0, None
    meta = read_json(paths.partial_meta)
    if meta is not None and meta.get("url") != url:
        discard_partial(paths)
        return 0, None
    return size, meta


def discard_partial(paths: CachePaths) -> None:
    for p in (paths.partial, paths.partial_meta):
        p.unlink(missing_ok=True)


class PartialSink:
    """The open partial file and the running digest of all its bytes."""

    def __init__(self, path: Path, offset: int, hasher) -> None:
        self.file = path.open("r+b" if offset else "wb")
        if offset:
            self.file.seek(offset)
            self.file.truncate()
        self.hasher = hasher
        self.size = offset

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def close(self, sync: bool = False) -> None:
        """Flush (and fsync) and close; the file is closed even when flushing fails (a full disk)."""
        try:
            self.file.flush()
            if sync:
                os.fsync(self.file.fileno())
        finally:
            self.file.close()


def finalize(paths: CachePaths, url: str, digest: str) -> Verified:
    os.replace(paths.partial, paths.final)
    st = paths.final.stat()
    write_json(paths.sidecar, {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "url": url})
    paths.partial_meta.unlink(missing_ok=True)
    return Verified(paths.final, st.st_size, st.st_mtime_ns, digest)
