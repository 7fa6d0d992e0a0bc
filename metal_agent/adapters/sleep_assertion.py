"""Hold macOS's "no idle sleep" assertion while services serve: one supervised caffeinate child.

Why a child and not IOKit: the agent is pure Python without PyObjC, and
`caffeinate -i -w <agent pid>` ends by itself when the agent's process ends,
however it ends (SIGKILL included), so the assertion cannot outlive the
agent by design. The child is still recorded in the state directory: a new
agent ends a caffeinate a previous one left (it may only be one it can prove
it started: same pid, same start time, same command line, same user) before
it takes its own, so there is never more than one.

At most one child is held; `release()` (the agent's shutdown) stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import structlog
from prometheus_client import CollectorRegistry, Gauge

from metal_agent.core.names import METRIC_PREFIX as P
from metal_agent.core.sleep_assertion import CAFFEINATE, SleepMode, caffeinate_argv, want_held
from metal_agent.tasks import within

log = structlog.get_logger(__name__)

RECORD_NAME = "sleep_assertion.json"
STOP_TIMEOUT_S = 5.0
SPAWN_RETRY_S = 60.0
IDENTITY_TRIES, IDENTITY_RETRY_S = 50, 0.02  # a caffeinate that cannot start is tried again this often, not every tick


def _matches(record: dict) -> psutil.Process | None:
    """The recorded caffeinate when it is provably the one recorded, else None (pids are reused)."""
    try:
        proc = psutil.Process(int(record["pid"]))
        same = (abs(proc.create_time() - float(record["create_time"])) < 0.01
                and proc.cmdline() == list(record["cmdline"]) and proc.uids().real == os.getuid())
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
    return proc if same else None


class SleepAssertion:
    def __init__(self, registry: CollectorRegistry, *, mode: SleepMode, state_dir: Path,
                 active: Callable[[], int], caffeinate: str = CAFFEINATE, interval: float = 1.0) -> None:
        self.mode = mode
        self.record = state_dir / RECORD_NAME
        self.active = active
        self.caffeinate = caffeinate
        self.interval = interval
        self._proc: asyncio.subprocess.Process | None = None
        self._spawn_failed_at: float | None = None
        self.problem: str | None = None  # why it is wanted and not held
        Gauge(P + "sleep_assertion_held", "1 while the agent holds macOS's PreventUserIdleSystemSleep assertion "
              "(a caffeinate -i child)", registry=registry).set_function(lambda: 1 if self.held else 0)

    @property
    def held(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.held and self._proc else None

    def view(self) -> dict:
        return {"mode": self.mode.value, "held": self.held, "pid": self.pid, "problem": self.problem}

    async def end_stale(self) -> None:
        """End a caffeinate a previous agent recorded and left running (if it is provably that one)."""
        try:
            record = json.loads(await asyncio.to_thread(self.record.read_text))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            log.warning("unreadable sleep assertion record; removing it", path=str(self.record), error=str(err))
            record = {}
        if isinstance(record, dict) and record.get("pid") == self.pid:
            return  # our own child (this loop restarted): keep it
        if isinstance(record, dict) and (proc := _matches(record)) is not None:
            log.info("ending the caffeinate a previous agent left", pid=proc.pid)
            with contextlib.suppress(psutil.Error):
                proc.terminate()
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.record.unlink)

    async def _spawn(self) -> None:
        if self._spawn_failed_at is not None and time.monotonic() - self._spawn_failed_at < SPAWN_RETRY_S:
            return
        argv = caffeinate_argv(os.getpid(), self.caffeinate)
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            self._spawn_failed_at = time.monotonic()
            self.problem = f"cannot run {self.caffeinate}: {err.strerror or err}"
            # Off macOS (development) there is no caffeinate and no sleep to prevent: not a warning.
            (log.warning if sys.platform == "darwin" else log.info)(
                "cannot hold the no-idle-sleep assertion; the Mac may sleep while serving",
                caffeinate=self.caffeinate, error=self.problem)
            return
        self._proc, self._spawn_failed_at, self.problem = proc, None, None
        seen = await self._identity(proc.pid)
        if seen is None:  # gone already: the next tick sees it ended
            return
        create_time, cmdline = seen
        payload = json.dumps({"pid": proc.pid, "create_time": create_time, "cmdline": cmdline})
        await asyncio.to_thread(self.record.write_text, payload)
        log.info("holding the no-idle-sleep assertion", pid=proc.pid, argv=list(argv), mode=self.mode.value)

    @staticmethod
    async def _identity(pid: int) -> tuple[float, list[str]] | None:
        """Start time and command line as the system reports them (what a later agent compares
        against). A just-started process can briefly show an empty command line: asked again."""
        for _ in range(IDENTITY_TRIES):
            try:
                proc = psutil.Process(pid)
                create_time, cmdline = proc.create_time(), proc.cmdline()
            except psutil.Error:
                return None
            if cmdline:
                return create_time, cmdline
            await asyncio.sleep(IDENTITY_RETRY_S)
        return None

    async def release(self) -> None:
        """Stop the child (if any) and forget its record."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await within(proc.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            log.info("released the no-idle-sleep assertion", pid=proc.pid)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.record.unlink)

    async def apply(self) -> None:
        """Hold or release, as the mode and the number of active services say."""
        if self._proc is not None and self._proc.returncode is not None:
            log.warning("caffeinate ended on its own; taking the assertion again", pid=self._proc.pid,
                        returncode=self._proc.returncode)
            self._proc = None
        want = want_held(self.mode, self.active())
        if want and not self.held:
            await self._spawn()
        elif not want:
            self.problem = None
            if self.held:
                await self.release()

    async def run(self) -> None:
        await self.end_stale()
        while True:
            await self.apply()
            await asyncio.sleep(self.interval)
