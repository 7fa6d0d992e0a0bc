"""The front door process: spawned, supervised, and adopted across agent restarts.

It outlives the agent on purpose (an agent restart or upgrade must drop no
request in flight), so, like the engines, it is recorded in the state
directory and the next agent re-attaches to it instead of starting another.
The record is believed on the same terms as an engine's
(adapters/process/records.py): a file only this user could write, read
without following a symlink, and a live process whose pid, start time and
whole command line match it. Otherwise a new front door is started.

As for the engines, the record is written before the exec, without a pid: an agent killed (or
cancelled) between the exec and the full record leaves a front door the next agent still finds
by its command line (unique: it names this state directory's socket) and adopts, never a second
one beside an unrecorded first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import psutil
import structlog

from metal_agent.adapters.process.exitwatch import wait_exit
from metal_agent.adapters.process.logfile import ServiceLog
from metal_agent.adapters.process.pause_point import AFTER_FRONT_DOOR_EXEC, pause_point
from metal_agent.adapters.process.records import argv_digest, find_unrecorded, live_process
from metal_agent.adapters.process.terminate import terminate_group
from metal_agent.core.backoff import Backoff

log = structlog.get_logger(__name__)

RECORD_FILE = "front-door.json"
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class FrontDoorRecord:
    pid: int
    create_time: float
    boot_time: float
    argv: tuple[str, ...]
    argv_digest: str


def read_record(path: Path) -> FrontDoorRecord | None:
    """The record if this user alone could have written it and it is consistent; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            log.warning("ignoring the front door's record: others could have written it", file=str(path))
            return None
        text = f.read(MAX_RECORD_BYTES + 1)
    try:
        data = json.loads(text)
        record = FrontDoorRecord(pid=int(data["pid"]), create_time=float(data["create_time"]),
                                 boot_time=float(data["boot_time"]), argv=tuple(str(a) for a in data["argv"]),
                                 argv_digest=str(data["argv_digest"]))
    except (ValueError, TypeError, KeyError):
        return None
    if record.pid < 0 or argv_digest(record.argv) != record.argv_digest:
        return None
    return record


def resolve_record(path: Path) -> FrontDoorRecord | None:
    """The record, completed with the pid of the process a pre-exec record (pid 0) stands for
    (and saved so); a pre-exec record whose process does not run is removed. Blocking: call
    it in a thread."""
    record = read_record(path)
    if record is None or record.pid:
        return record
    found = find_unrecorded(record)
    if found is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    write_record(path, found)
    return found


def write_record(path: Path, record: FrontDoorRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".front-door-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class FrontDoorProcess:
    def __init__(self, argv: Sequence[str], *, state_dir: Path, log_path: Path,
                 healthy: Callable[[], Awaitable[bool]], on_start: Callable[[], None],
                 backoff: Backoff = Backoff(initial=0.2, factor=2.0, cap=10.0, reset_after=60.0),
                 health_timeout: float = 10.0, stop_grace: float = 30.0) -> None:
        """`healthy()`: does its control socket answer; `on_start()`: it (re)started or was
        adopted (the table is pushed again)."""
        self.argv = tuple(argv)
        self.record_path = state_dir / RECORD_FILE
        self.log = ServiceLog(log_path)
        self.healthy = healthy
        self.on_start = on_start
        self.backoff = backoff
        self.health_timeout = health_timeout
        self.stop_grace = stop_grace  # SIGTERM lets it finish requests in flight (its own --grace), then SIGKILL
        self.pid: int | None = None
        self.create_time = 0.0
        self.child: asyncio.subprocess.Process | None = None
        self.adopted = False
        self.up = False  # running and its control socket answered
        self.restarts = 0
        self.started = asyncio.Event()  # set once up the first time (tests and start-up wait on it)

    def readiness(self) -> bool | str:
        return True if self.up else "the front door is not running (it is being started)"

    def adopt(self) -> bool:
        """Re-attach to the front door a previous agent left running, if provably it."""
        record = resolve_record(self.record_path)
        if record is None or live_process(record) is None:
            return False
        self.pid, self.create_time, self.adopted = record.pid, record.create_time, True
        log.info("adopted the running front door", pid=record.pid)
        return True

    async def run(self) -> None:
        failures = 0
        while True:
            began = time.monotonic()
            if self.pid is None:
                try:
                    await self._spawn()
                except OSError as err:  # the state directory or the command: said, and tried again
                    log.error("cannot start the front door", error=str(err))
                    failures += 1
                    await asyncio.sleep(self.backoff.delay(failures))
                    continue
            exited = asyncio.ensure_future(self._wait_exit())
            try:
                await self._until_healthy(exited)
                await exited
            finally:
                exited.cancel()
            self.up = False
            log.warning("the front door exited; restarting it", pid=self.pid,
                        code=self.child.returncode if self.child else None)
            self.pid, self.child, self.adopted = None, None, False
            failures = self.backoff.failures_after_run(failures, time.monotonic() - began)
            self.restarts += 1
            await asyncio.sleep(self.backoff.delay(failures))

    async def _spawn(self) -> None:
        """The launch is shielded from cancellation (an agent stopping mid-spawn): it always ends
        with the process recorded (or stopped), never running unrecorded."""
        launch = asyncio.ensure_future(self._launch())
        try:
            await asyncio.shield(launch)
        except asyncio.CancelledError:
            await launch
            raise

    async def _launch(self) -> None:
        pending = FrontDoorRecord(0, 0.0, psutil.boot_time(), self.argv, argv_digest(self.argv))
        await asyncio.to_thread(write_record, self.record_path, pending)  # fails: nothing is started
        fd = self.log.open_for_child()
        try:
            # Its own session: a signal to the agent's group (Ctrl-C, launchd) must not reach it.
            self.child = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self.record_path.unlink()
            raise
        finally:
            os.close(fd)
        pause_point(AFTER_FRONT_DOOR_EXEC)  # tests only (pause_point.py): the exec-to-record window
        self.pid = self.child.pid
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:
            self.create_time = time.time()
        record = FrontDoorRecord(self.pid, self.create_time, psutil.boot_time(), self.argv, argv_digest(self.argv))
        try:
            await asyncio.to_thread(write_record, self.record_path, record)
        except OSError as err:
            # A front door no later agent could prove it started must not run.
            log.error("cannot record the front door; stopping it", pid=self.pid, error=str(err))
            exited = asyncio.ensure_future(self._wait_exit())
            try:
                await terminate_group(self.pid, exited, grace=2.0)
            finally:
                exited.cancel()
            raise
        log.info("front door started", pid=self.pid, argv=list(self.argv))

    async def _wait_exit(self) -> None:
        if self.child is not None:
            await self.child.wait()
        else:
            await wait_exit(self.pid)

    async def _until_healthy(self, exited: asyncio.Future) -> None:
        """Its socket answers (then it is up and gets the table), or it exited, or it never answered
        within the timeout (it is stopped and started again)."""
        deadline = time.monotonic() + self.health_timeout
        delay = 0.02
        while not exited.done():
            if await self.healthy():
                self.up = True
                self.started.set()
                self.on_start()
                return
            if time.monotonic() > deadline:
                log.warning("the front door does not answer on its socket; restarting it", pid=self.pid)
                await terminate_group(self.pid, exited, grace=2.0)
                return
            await asyncio.wait({exited}, timeout=delay)  # woken at once if it exits
            delay = min(delay * 2, 0.5)

    async def stop(self) -> None:
        """Only with --stop-on-exit: otherwise it keeps serving for the next agent to adopt."""
        if self.pid is None:
            return
        exited = asyncio.ensure_future(self._wait_exit())
        try:
            await terminate_group(self.pid, exited, grace=self.stop_grace)
        finally:
            exited.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        self.up = False
