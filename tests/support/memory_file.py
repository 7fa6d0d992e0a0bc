"""The memory readings file behind the agent's hidden `--memory-readings-file`.

The agent re-reads it at every memory check, so a test or the fault bench can
walk the real agent through Normal, Critical and back. It stands in for
macOS's memory figures and kernel pressure level, which exist only on a Mac
and cannot be pushed to critical on cue on a shared machine anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil

GiB = 1 << 30


class MemoryFile:
    def __init__(self, path: Path, total: int = 64 * GiB) -> None:
        self.path = path
        self.total = total
        self.set(0.5)

    def set(self, available_share: float) -> None:
        """Available memory as a share of the total (0.03: Critical; 0.5: Normal).

        At Critical this way nearly all the (64 GiB) total is in use and our llama-servers
        hold a sliver of it: the pressure comes from other processes, which the agent's
        friendly-fire guard refuses to relieve with our models. `critical_from_ours` is the
        other case."""
        self._write({"total_bytes": self.total, "available_bytes": int(available_share * self.total)})

    def critical(self, in_use: int) -> None:
        """Critical by the kernel's level (as macOS reports it), with `in_use` bytes of the total in use."""
        in_use = max(0, min(in_use, self.total))
        self._write({"total_bytes": self.total, "available_bytes": self.total - in_use, "kernel_level": "critical"})

    def critical_from_ours(self, pids: list[int], own_share: float = 0.8) -> int:
        """Critical, with the memory in use sized so that these processes (our llama-servers)
        hold `own_share` of it as their resident memory is now. Returns the bytes in use."""
        ours = sum(psutil.Process(pid).memory_info().rss for pid in pids)
        in_use = int(ours / own_share)
        self.critical(in_use)
        return in_use

    def _write(self, reading: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(reading))
        tmp.replace(self.path)  # the agent never reads half a file
