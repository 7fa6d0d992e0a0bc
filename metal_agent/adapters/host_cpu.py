"""How many threads llama-server should use on this host.

On Apple Silicon the answer is the number of *performance* cores: spreading
work onto efficiency cores makes every token wait for the slowest core.
macOS reports that count as `hw.perflevel0.physicalcpu`; Intel Macs and
other systems lack the key, so we fall back to the physical core count.
"""

from __future__ import annotations

import asyncio
import sys

import psutil
from metal_agent.tasks import within

SYSCTL = "/usr/sbin/sysctl"  # absolute: launchd gives agents a minimal PATH
_TIMEOUT_S = 5.0


async def performance_core_count() -> int | None:
    """Performance cores on macOS, physical cores elsewhere; None if unknown."""
    if sys.platform == "darwin":
        count = await _sysctl_int("hw.perflevel0.physicalcpu")
        if count:
            return count
    physical = psutil.cpu_count(logical=False)
    return physical if physical and physical > 0 else None


async def _sysctl_int(key: str) -> int | None:
    text = await sysctl_text(key)
    try:
        value = int(text) if text is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


async def sysctl_text(key: str) -> str | None:
    """`sysctl -n key`, stripped; None if it cannot be read."""
    try:
        proc = await asyncio.create_subprocess_exec(
            SYSCTL,
            "-n",
            key,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        out, _ = await within(proc.communicate(), _TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    if proc.returncode != 0:
        return None
    return out.decode(errors="replace").strip()
