"""Whether sudo lets a user run the power sampler's exact powermetrics command (`sudo -n -l`).

Why its own module: the sampler (`adapters.powermetrics`) runs the command;
this asks sudo about the grant for it, for `metal-agent doctor`, `power
serve` and the agent's start-up, which say what to run when it is missing
or stale (an older metal-agent's command, another interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
from dataclasses import dataclass
from typing import Literal

from metal_agent.core.sudoers import POWERMETRICS_PATH, SUDO_PATH, legacy_powermetrics_argv, powermetrics_argv
from metal_agent.tasks import within

_SUDO_CHECK_TIMEOUT_S = 15.0
_KILL_GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class SudoGrant:
    """Whether sudo lets a user run the sampler's exact powermetrics command.

    ``status`` is ``granted``; ``stale`` (a powermetrics grant exists but for
    other arguments: another interval, or the command of an older metal-agent
    without the pinned sample count); ``missing``; or ``unavailable`` (sudo
    could not be asked). ``fix`` says what to run.
    """

    status: Literal["granted", "stale", "missing", "unavailable"]
    user: str
    command: str
    detail: str
    fix: str | None

    @property
    def ok(self) -> bool:
        return self.status == "granted"


async def check_sudo_grant(interval_ms: int, *, user: str | None = None) -> SudoGrant:
    """Ask sudo (``sudo -n -l <command>``) whether the grant for ``interval_ms`` is in place.

    With ``user``, root checks another user's grant (``sudo -l -U user``), e.g.
    right after installing it; by default the current user is checked.
    """
    target = ["-U", user] if user else []
    who = user or pwd.getpwuid(os.geteuid()).pw_name
    command = powermetrics_argv(interval_ms)
    shown = " ".join(command)
    fix = (
        f"run `make install-powermetrics-sudo INTERVAL_MS={interval_ms}` in the metal-agent checkout "
        f"(or review the fragment first: `metal-agent render-sudoers --user {who} --interval-ms {interval_ms}`)"
    )
    try:
        rc, out, err = await _run_quiet([SUDO_PATH, "-n", "-l", *target, *command])
        if rc == 0:
            return SudoGrant("granted", who, shown, out.strip() or shown, None)
        rc_list, listing, _ = await _run_quiet([SUDO_PATH, "-n", "-l", *target])
    except (OSError, TimeoutError) as exc:
        return SudoGrant("unavailable", who, shown, f"could not ask {SUDO_PATH}: {exc!r}", fix)
    others = [ln for ln in _sudo_list_entries(listing) if POWERMETRICS_PATH in ln] if rc_list == 0 else []
    legacy = " ".join(legacy_powermetrics_argv(interval_ms))
    if any(_grants_exactly(entry, legacy) for entry in others):
        detail = (
            f"{who}'s grant is for `{legacy}`, the command of an older metal-agent (before the sample count "
            f"was pinned); this metal-agent runs `{shown}`"
        )
        refresh = (
            f"re-run `make install-powermetrics-sudo INTERVAL_MS={interval_ms}` in the metal-agent checkout "
            "(needed once after upgrading: the pinned command gained `-n`)"
        )
        return SudoGrant("stale", who, shown, detail, refresh)
    if others:
        detail = f"{who} may run powermetrics only as: {'; '.join(others)}; the agent needs `{shown}`"
        return SudoGrant("stale", who, shown, detail, fix)
    reason = err.strip() or f"sudo -l exited {rc}"
    return SudoGrant("missing", who, shown, f"{who} may not run `{shown}` without a password ({reason})", fix)


def _grants_exactly(entry: str, command: str) -> bool:
    """Whether a ``sudo -l`` entry lists ``command`` as a whole command (not as a prefix of a longer one)."""
    return re.search(r"(?:^|[:,]\s*)" + re.escape(command) + r"\s*(?:,|$)", entry) is not None


def _sudo_list_entries(listing: str) -> list[str]:
    """Entries of ``sudo -l`` output, re-joining the lines sudo wraps at 80 columns."""
    entries: list[str] = []
    for line in listing.splitlines():
        if line.startswith("        ") and entries:  # continuation of a wrapped entry
            entries[-1] += " " + line.strip()
        elif line.strip():
            entries.append(line.strip())
    return [e.replace("\\,", ",") for e in entries]


async def _run_quiet(argv: list[str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    try:
        out, err = await within(proc.communicate(), _SUDO_CHECK_TIMEOUT_S)
    finally:
        if proc.returncode is None:  # timed out or cancelled: end it if we may, never raise over it
            await _kill(proc)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL and wait a moment; sudo may run as root where we may not signal it (EPERM)."""
    try:
        proc.kill()
    except ProcessLookupError:
        pass  # already gone
    except PermissionError:
        return
    with contextlib.suppress(TimeoutError):
        await within(proc.wait(), _KILL_GRACE_S)
