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
from dataclasses import asdict, dataclass, replace
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
    boot_time: float = 0.0  # psutil.boot_time() when recorded (0: unknown, older records)
    # The engine that runs it (core.engine.EngineName), so a later agent probes and names it
    # right before it sees the spec; records of older agents are llama-server's.
    engine: str = "llama-server"


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

    def remove(self, key: str, *, pid: int | None = None, create_time: float | None = None) -> bool:
        """Delete the record of `key`; with `pid`/`create_time`, only if it still describes
        that process. A stop or an exit handled after an await must not delete the record
        of the newer process that replaced it: that process would be orphaned, neither
        adoptable nor stoppable by the next agent. True if a record was deleted."""
        path = self.dir / _file_name(key)
        if pid is not None:
            current = self._read(path)
            if current is None or current.pid != pid or (create_time is not None and current.create_time != create_time):
                return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            return True
        return False

    @staticmethod
    def _read(path: Path) -> ProcessRecord | None:
        """The record in `path`, or None for anything that is not one of ours, whatever its
        shape (truncated, binary, valid JSON of another shape): a bad file in the state
        directory must never stop the agent from starting."""
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
                return None
            data["argv"] = tuple(str(a) for a in data.get("argv") or ())
            record = ProcessRecord(**data)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        typed = (isinstance(record.pid, int) and not isinstance(record.pid, bool) and record.pid >= 0
                 and isinstance(record.create_time, (int, float)) and isinstance(record.boot_time, (int, float))
                 and isinstance(record.port, int) and all(isinstance(v, str) for v in (
                     record.key, record.uid, record.spec_hash, record.host, record.argv_digest, record.engine)))
        return record if typed else None

    def load_all(self) -> list[ProcessRecord]:
        """Every readable record; unreadable ones are skipped (and left for inspection)."""
        return [r for r in map(self._read, sorted(self.dir.glob("*.json"))) if r is not None]


CREATE_TIME_TOLERANCE_S = 1.0


def same_start(record: ProcessRecord, create_time: float, boot_time: float) -> bool:
    """Did the process start when the record says, even if the wall clock stepped since?

    psutil derives create times from the wall clock differently per OS: on
    Linux it is boot time + ticks (a clock step shifts boot time and every
    create time with it; the time since boot stays), on macOS the kernel keeps
    the absolute start (the time since boot shifts). So either the absolute or
    the boot-relative start must match. Together with the pid and the digest
    of the whole command line (which holds the unique port), that is proof.
    """
    if abs(create_time - record.create_time) <= CREATE_TIME_TOLERANCE_S:
        return True
    if record.boot_time:
        return abs((create_time - boot_time) - (record.create_time - record.boot_time)) <= CREATE_TIME_TOLERANCE_S
    return False


def find_unrecorded(record: ProcessRecord) -> ProcessRecord | None:
    """The process a pre-exec record (pid 0) stands for, if one runs: the only one whose
    whole command line has the record's digest (it includes the port, so it is unique).
    Returns the record completed with its pid and start time, or None."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmdline = proc.info["cmdline"]
            if cmdline and argv_digest(cmdline) == record.argv_digest:
                found.append(proc)
        except psutil.Error:
            continue
    if len(found) != 1:
        return None
    return replace(record, pid=found[0].pid, create_time=found[0].info["create_time"] or 0.0)


def live_process(record: ProcessRecord) -> psutil.Process | None:
    """The process the record describes, if it provably is still that process."""
    try:
        proc = psutil.Process(record.pid)
        if not same_start(record, proc.create_time(), psutil.boot_time()):
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if argv_digest(proc.cmdline()) != record.argv_digest:
            return None
        return proc
    except (psutil.Error, OSError):
        return None
