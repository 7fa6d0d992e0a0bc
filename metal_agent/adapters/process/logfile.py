"""Per-service llama-server log files, size-capped, that outlive the agent.

llama-server writes straight into the file (stdout and stderr, opened with
O_APPEND), never into a pipe held by the agent: an adopted llama-server whose
original agent died would otherwise get SIGPIPE on its next log line. Because
the writer appends, rotation by copy-then-truncate is safe without any help
from llama-server. The "last lines in memory" the user needs on a failure are
read back from the end of the file, which works across agent restarts too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class ServiceLog:
    def __init__(self, path: Path, max_bytes: int = 20 * 1024 * 1024, backups: int = 2) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups

    def open_for_child(self) -> int:
        """A file descriptor to hand to the child as stdout and stderr (caller closes it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def mark(self) -> int:
        """The current end of the log, to read only what a new run writes."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_since(self, offset: int, limit: int = 256 * 1024) -> str:
        """Text written after `offset` (at most the last `limit` bytes of it)."""
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                if offset > size:  # rotated since: everything left is new
                    offset = 0
                f.seek(max(offset, size - limit))
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 20, limit: int = 64 * 1024) -> list[str]:
        text = self.read_since(0, limit)
        return text.splitlines()[-lines:]

    def rotate_if_needed(self) -> bool:
        """Copy-truncate when over the cap; returns True when it rotated."""
        try:
            if self.path.stat().st_size <= self.max_bytes:
                return False
        except FileNotFoundError:
            return False
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            shutil.copyfile(self.path, self.path.with_name(f"{self.path.name}.1"))
        with self.path.open("r+b") as f:
            f.truncate(0)
        return True
