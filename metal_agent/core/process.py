"""What a supervised llama-server is doing, as plain values.

The supervisor (an adapter) produces these; status computation, metrics and
the CLI (consumers) read them. Keeping them here, free of I/O, lets the
status rules be tested as pure functions.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from metal_agent.core.llama_log import Acceleration


class State(str, enum.Enum):
    STARTING = "Starting"  # spawned, loading the model
    READY = "Ready"
    UNHEALTHY = "Unhealthy"  # running, liveness failing
    BACKOFF = "CrashLoopBackOff"  # waiting to restart after a failure
    STOPPED = "Stopped"


class ExitReason(str, enum.Enum):
    PROCESS_EXITED = "ProcessExited"
    STARTUP_TIMEOUT = "StartupTimeout"
    UNHEALTHY = "LivenessFailed"
    SPAWN_FAILED = "SpawnFailed"


@dataclass(frozen=True)
class ExitInfo:
    reason: ExitReason
    code: int | None  # None when unknown (an adopted process is not our child)
    stderr_tail: tuple[str, ...]
    at: float
    server: str = "llama-server"  # the engine's process (core.engine `display`), for messages

    def describe(self) -> str:
        if self.code is None:
            how = "exited"
        elif self.code < 0:
            how = f"was killed by signal {signal.Signals(-self.code).name}" if -self.code in signal.valid_signals() else f"died ({self.code})"
        else:
            how = f"exited with code {self.code}"
        head = {
            ExitReason.STARTUP_TIMEOUT: f"{self.server} did not become healthy in time and was stopped",
            ExitReason.UNHEALTHY: f"{self.server} stopped answering /health and was restarted",
            ExitReason.SPAWN_FAILED: f"{self.server} could not be started",
        }.get(self.reason, f"{self.server} {how}")
        tail = " | ".join(self.stderr_tail)
        return f"{head}: {tail}" if tail else head


@dataclass(frozen=True)
class Snapshot:
    key: str
    spec_hash: str
    state: State
    pid: int | None = None
    port: int | None = None
    host: str = ""
    restarts: int = 0
    adopted: bool = False
    started_at: float | None = None
    ready_at: float | None = None
    next_start_at: float | None = None
    last_exit: ExitInfo | None = None
    acceleration: Acceleration | None = None
    server: str = "llama-server"  # the engine's process (core.engine `display`), for messages

    @property
    def ready(self) -> bool:
        return self.state is State.READY


@dataclass(frozen=True)
class SupervisorEvent:
    reason: str
    message: str
    warning: bool = False


