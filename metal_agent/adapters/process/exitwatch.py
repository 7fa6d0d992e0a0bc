"""Know the instant a process exits, whether or not it is our child.

A child spawned by this agent is awaited directly. A process adopted from a
previous agent is not our child, so `waitpid` cannot see it; the kernel still
tells us without polling: a pidfd becomes readable on Linux, and kqueue's
EVFILT_PROC/NOTE_EXIT fires on macOS. Only where neither exists do we fall
back to polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select

import psutil


async def wait_exit(pid: int, poll_interval: float = 0.5) -> None:
    """Return once `pid` no longer runs (a zombie counts as gone)."""
    if hasattr(os, "pidfd_open"):
        await _wait_pidfd(pid)
    elif hasattr(select, "kqueue"):
        await _wait_kqueue(pid)
    else:  # pragma: no cover - neither Linux nor macOS
        await _wait_poll(pid, poll_interval)


async def _wait_pidfd(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _wait_kqueue(pid: int) -> None:  # pragma: no cover - macOS only
    kq = select.kqueue()
    try:
        event = select.kevent(pid, filter=select.KQ_FILTER_PROC, flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
                              fflags=select.KQ_NOTE_EXIT)
        try:
            kq.control([event], 0, 0)
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(kq.fileno(), lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            loop.remove_reader(kq.fileno())
    finally:
        kq.close()


async def _wait_poll(pid: int, interval: float) -> None:  # pragma: no cover
    while True:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                await asyncio.sleep(interval)
                continue
        return
