"""Stopping a llama-server's process group: politely, then for sure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


async def terminate_group(pid: int, exited: asyncio.Future, grace: float, kill_wait: float = 5.0) -> bool:
    """SIGTERM the group (with SIGCONT, so a stopped process can act on it), SIGKILL after `grace`.

    `exited` completes when the process is gone. Returns True once it is.
    Callers have already proven `pid` is the process they mean.
    """
    for signals, wait in (((signal.SIGTERM, signal.SIGCONT), grace), ((signal.SIGKILL,), kill_wait)):
        for sig in signals:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        done, _ = await asyncio.wait({exited}, timeout=wait)
        if done:
            return True
    return False
