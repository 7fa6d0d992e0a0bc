"""What every doctor check returns, how it is printed, and the helpers the checks share.

Why its own module: the checks are grouped by what they look at (this Mac
and its install in `cli.doctor_checks`, the cluster in `cli.doctor_cluster`,
the MLX engine in `cli.doctor_mlx`), and all of them speak `CheckResult`.
External commands run through `run_command` (no shell, with a timeout): a
hung `system_profiler` must not hang the doctor.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import platform
from dataclasses import dataclass
from typing import Sequence

from metal_agent.tasks import within

COMMAND_TIMEOUT_S = 10.0


class Status(enum.Enum):
    OK = "✓"
    FAIL = "✗"
    SKIP = "–"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.OK, detail)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, fix)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)


def is_mac(system: str | None) -> bool:
    return (system or platform.system()) == "Darwin"


def not_mac(name: str, system: str | None) -> CheckResult:
    return skip(name, f"only on macOS (this is {system or platform.system()})")


async def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S, **how) -> tuple[int, str]:
    """Exit status and stdout+stderr of a command; kills it on timeout (TimeoutError).

    `how` goes to `create_subprocess_exec` (env, cwd, user, start_new_session); the
    environment defaults to ours with `LC_ALL=C`, so output is parsed in one language.
    """
    how.setdefault("env", {**os.environ, "LC_ALL": "C"})
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        **how,
    )
    try:
        out, _ = await within(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def format_result(result: CheckResult) -> str:
    line = f"{result.status.value} {result.name}: {result.detail}"
    if result.status is Status.SKIP:
        line = f"{result.status.value} {result.name}: skipped, {result.detail}"
    if result.fix and result.status is Status.FAIL:
        line += f"\n    fix: {result.fix}"
    return line
