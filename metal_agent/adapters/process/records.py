"""Records of the llama-servers this agent started, so the next agent can adopt them.

Loading a 40 GB model takes minutes; an agent restart (upgrade, crash,
launchd) must not cost that. Each running process gets a small JSON record in
the state directory. A later agent re-attaches only when the pid still runs
*and* its create time and command line match the record: pids are reused, and
this agent must never signal a process it cannot prove it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import psutil

RECORD_VERSION = 1


def argv_digest(argv: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()


@dataclass(frozen=True)
class ProcessRecord:
    key: str  # "namespace/name"
    uid: str  # the InferenceService's uid: a re-created object is a new service
    pid: int
    create_time: float
    spec_hash: str
    port: int
    host: str
    argv_digest: str
    version: int = RECORD_VERSION
    # The full command line, so a later agent can keep running this exact
    # process (and restart it as it was) while the current spec is invalid.
    argv: tuple[str, ...] = ()


def _file_name(key: str) -> str:
    # Namespaces and names are DNS labels/subdomains: "/" is the only character to map.
    return key.replace("/", "__") + ".json"


class RecordStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def save(self, record: ProcessRecord) -> None:
        """Write atomically: a half-written record after a crash would orphan a process."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".record-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(record), f)
            os.replace(tmp, self.dir / _file_name(record.key))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / _file_name(key)).unlink()

    def load_all(self) -> list[ProcessRecord]:
        """Every readable record; unreadable ones are skipped (and left for inspection)."""
        records = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                if data.get("version") != RECORD_VERSION:
                    continue
                data["argv"] = tuple(data.get("argv") or ())
                records.append(ProcessRecord(**data))
            except (OSError, ValueError, TypeError):
                continue
        return records


def live_process(record: ProcessRecord) -> psutil.Process | None:
    """The process the record describes, if it provably is still that process."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 0.01:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if argv_digest(proc.cmdline()) != record.argv_digest:
            return None
        return proc
    except (psutil.Error, OSError):
        return None
