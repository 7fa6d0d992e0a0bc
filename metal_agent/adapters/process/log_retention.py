"""Keep the log directory bounded: the agent's own log, and logs of services long gone.

launchd writes the agent's stdout and stderr into `agent.log` and never
rotates it; it opens the file for appending, so the same copy-then-truncate
that caps llama-server logs caps it too, from inside the agent. A service's
log outlives the service on purpose (its last lines explain why it went);
after `retention` seconds without a write, and with no service of that name
supervised, it and its rotated copies go.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from metal_agent.adapters.process.logfile import ServiceLog

AGENT_LOG = "agent.log"


def rotate_agent_log(log_dir: Path, max_bytes: int, backups: int = 2) -> bool:
    """Cap `agent.log` if it is where this process's stderr goes (launchd); True if rotated.

    From a terminal, stderr is not that file and nothing is touched.
    """
    path = log_dir / AGENT_LOG
    try:
        ours, there = os.fstat(2), path.stat()
    except OSError:
        return False
    if (ours.st_dev, ours.st_ino) != (there.st_dev, there.st_ino):
        return False
    return ServiceLog(path, max_bytes=max_bytes, backups=backups).rotate_if_needed()


def remove_stale_service_logs(log_dir: Path, live_files: Iterable[str], retention: float,
                              now: float | None = None) -> list[str]:
    """Delete service logs (and rotated copies) untouched for `retention` seconds whose
    service is not supervised. Returns the names removed."""
    now = time.time() if now is None else now
    live = set(live_files)
    removed = []
    for path in sorted(log_dir.glob("*__*.log*")):
        base = path.name.split(".log", 1)[0] + ".log"
        if base in live or base == AGENT_LOG:
            continue
        try:
            if now - path.stat().st_mtime > retention:
                path.unlink()
                removed.append(path.name)
        except FileNotFoundError:
            continue
    return removed
