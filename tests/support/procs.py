"""Child processes the test harness owns (etcd, kube-apiserver, agents...).

Each runs in its own session so a stop reaches its whole process group, logs
to a file the failure message can quote, and is always reaped: a test suite
that leaks a kube-apiserver poisons every run after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Mapping, Sequence


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL after `grace` seconds; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except asyncio.TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        # Reap anything the group left behind (e.g. grandchildren).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"({self.name}: no log yet)"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])


def stopped(pid: int) -> bool:
    """True once every thread of `pid` is in job-control stop (state T).

    `kill(SIGSTOP)` returns as soon as the signal is queued; the threads stop
    when each is next scheduled, so on a loaded machine a process signalled
    a moment ago may still answer a request. A test that needs it frozen
    waits for this first.
    """
    tasks = Path(f"/proc/{pid}/task")
    try:
        states = [(tasks / tid / "stat").read_text().rsplit(")", 1)[1].split()[0] for tid in os.listdir(tasks)]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(states) and all(state in ("T", "t") for state in states)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited. A zombie counts as gone: an orphan whose
    agent was killed is re-parented, and its new parent may reap it late."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
