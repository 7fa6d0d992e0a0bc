"""Records of the llama-servers this agent started, so the next agent can adopt them.

Loading a 40 GB model takes minutes; an agent restart (upgrade, crash,
launchd) must not cost that. Each running process gets a small JSON record in
the state directory. A later agent re-attaches only when the pid still runs
*and* its create time and command line match the record: pids are reused, and
this agent must never signal a process it cannot prove it started.

A record decides what the agent signals and what it runs again after a
crash (`argv`), so a record is believed only when nobody but the agent's
user could have written it, and when it is consistent with itself:

- the directory and the file belong to the agent's user (the effective uid)
  and are writable by nobody else; the file is opened without following a
  symlink (O_NOFOLLOW) and checked on the open descriptor (fstat), so it
  cannot be swapped between the check and the read;
- `argv` hashes to `argv_digest` (which the live process is matched
  against), the key is a namespace/name of Kubernetes' shape matching the
  file's name (log paths are made from it), and the engine is one the agent
  knows.

Anything else is ignored, left in place for inspection, with a log line
naming the file and why. The agent itself refuses to write a record into a
directory others can write (the spawn fails with that reason).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import psutil
import structlog

from metal_agent.core.engine_name import EngineName

log = structlog.get_logger(__name__)

RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024  # a record is a few hundred bytes; anything bigger is not one
_KEY = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
_ENGINES = frozenset(e.value for e in EngineName)


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
    # The engine that runs it (core.engine_name.EngineName), so a later agent probes and names it
    # right before it sees the spec; records of older agents are llama-server's.
    engine: str = "llama-server"


def _file_name(key: str) -> str:
    # Namespaces and names are DNS labels/subdomains: "/" is the only character to map.
    return key.replace("/", "__") + ".json"


class UntrustedRecords(OSError):
    """The record directory or file could be written by someone other than the agent's user."""


def _only_mine(st: os.stat_result, what: str) -> None:
    """Raise UntrustedRecords unless `st` belongs to this user and nobody else may write it."""
    if st.st_uid != os.geteuid():
        raise UntrustedRecords(f"{what} belongs to uid {st.st_uid}, not to the agent's user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedRecords(f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def consistency_problem(record: ProcessRecord, file_name: str) -> str | None:
    """Why `record` (read from `file_name`) cannot be the agent's own, if it cannot."""
    if not _KEY.match(record.key) or _file_name(record.key) != file_name:
        return f"its key {record.key[:80]!r} is not the namespace/name its file is named for"
    if record.argv and argv_digest(record.argv) != record.argv_digest:
        return "its command line does not match its digest"
    if record.engine not in _ENGINES:
        return f"it names an unknown engine {record.engine[:40]!r}"
    if not 0 <= record.port <= 65535:
        return f"its port {record.port} is out of range"
    return None


class RecordStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _open_dir(self) -> int:
        """A descriptor of the record directory, after proving only this user can write it."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _only_mine(os.fstat(fd), f"the record directory {self.dir}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def save(self, record: ProcessRecord) -> None:
        """Write atomically: a half-written record after a crash would orphan a process.
        Refused (UntrustedRecords) in a directory others could write: they could forge records."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(self._open_dir())
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
            current = self._read_quietly(path.name)
            if current is None or current.pid != pid or (create_time is not None and current.create_time != create_time):
                return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            return True
        return False

    def _read_quietly(self, name: str) -> ProcessRecord | None:
        try:
            dir_fd = self._open_dir()
        except OSError:
            return None
        try:
            return self._read(name, dir_fd)
        except UntrustedRecords:
            return None
        finally:
            os.close(dir_fd)

    @staticmethod
    def _read(name: str, dir_fd: int) -> ProcessRecord | None:
        """The record in file `name`, or None for anything that is not a record at all, whatever
        its shape (truncated, binary, valid JSON of another shape): a bad file in the state
        directory must never stop the agent from starting. Raises UntrustedRecords for a
        record that could have been forged."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UntrustedRecords(f"{name} is a symbolic link") from err
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UntrustedRecords(f"{name} is not a regular file")
            _only_mine(st, name)
            text = f.read(MAX_RECORD_BYTES + 1)
        if len(text) > MAX_RECORD_BYTES:
            return None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
                return None
            data["argv"] = tuple(str(a) for a in data.get("argv") or ())
            record = ProcessRecord(**data)
        except (ValueError, TypeError, AttributeError):
            return None
        typed = (isinstance(record.pid, int) and not isinstance(record.pid, bool) and record.pid >= 0
                 and isinstance(record.create_time, (int, float)) and isinstance(record.boot_time, (int, float))
                 and isinstance(record.port, int) and not isinstance(record.port, bool)
                 and all(isinstance(v, str) for v in (
                     record.key, record.uid, record.spec_hash, record.host, record.argv_digest, record.engine)))
        if not typed:
            return None
        if problem := consistency_problem(record, name):
            raise UntrustedRecords(f"{name}: {problem}")
        return record

    def load_all(self) -> list[ProcessRecord]:
        """Every record the agent can believe. Unreadable ones are skipped, untrusted ones
        ignored with a log line; both are left in place for inspection."""
        try:
            dir_fd = self._open_dir()
        except FileNotFoundError:
            return []
        except OSError as err:
            log.error("ignoring every process record: their directory is not the agent's alone",
                      directory=str(self.dir), why=str(err))
            return []
        records = []
        try:
            for name in sorted(os.listdir(dir_fd)):
                if not name.endswith(".json"):
                    continue
                try:
                    record = self._read(name, dir_fd)
                except UntrustedRecords as err:
                    log.warning("ignoring a process record the agent cannot trust", file=str(self.dir / name),
                                why=str(err))
                    continue
                if record is not None:
                    records.append(record)
        finally:
            os.close(dir_fd)
        return records


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
    for proc in psutil.process_iter(["cmdline", "create_time", "uids"]):
        try:
            cmdline = proc.info["cmdline"]
            if cmdline and argv_digest(cmdline) == record.argv_digest and _runs_as_me(proc.info["uids"]):
                found.append(proc)
        except psutil.Error:
            continue
    if len(found) != 1:
        return None
    return replace(record, pid=found[0].pid, create_time=found[0].info["create_time"] or 0.0)


def _runs_as_me(uids) -> bool:
    """A process of another user cannot be one this agent started (and is not its to signal)."""
    return uids is not None and uids.real == os.geteuid()


def live_process(record: ProcessRecord) -> psutil.Process | None:
    """The process the record describes, if it provably is still that process."""
    try:
        proc = psutil.Process(record.pid)
        if not _runs_as_me(proc.uids()):
            return None
        if not same_start(record, proc.create_time(), psutil.boot_time()):
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if argv_digest(proc.cmdline()) != record.argv_digest:
            return None
        return proc
    except (psutil.Error, OSError):
        return None
