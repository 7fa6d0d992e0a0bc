"""The memory readings file behind the agent's hidden `--memory-readings-file`.

The agent re-reads it at every memory check, so a test or the fault bench can
walk the real agent through Normal, Critical and back. It stands in for
macOS's memory figures and kernel pressure level, which exist only on a Mac
and cannot be pushed to critical on cue on a shared machine anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

GiB = 1 << 30


class MemoryFile:
    def __init__(self, path: Path, total: int = 64 * GiB) -> None:
        self.path = path
        self.total = total
        self.set(0.5)

    def set(self, available_share: float) -> None:
        """Available memory as a share of the total (0.03: Critical; 0.5: Normal)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"total_bytes": self.total, "available_bytes": int(available_share * self.total)}))
        tmp.replace(self.path)  # the agent never reads half a file
