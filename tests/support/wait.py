"""Wait on conditions, never on the clock.

Tests poll a condition at a short interval until it holds or a deadline
passes; the deadline is generous (the machine may be loaded) and a timeout
says what was awaited and, if given, what the system was doing.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


async def wait_for(
    condition: Callable[[], T | Awaitable[T]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Return the first truthy value of `condition()`; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        last = value
        if time.monotonic() >= deadline:
            detail = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){detail}")
        await asyncio.sleep(interval)
