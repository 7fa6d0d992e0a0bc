"""The stable-port book on disk (`<state>/front-door-ports.json`) and finding free ports.

Written atomically (a torn file after a crash would move every service's port)
and only read back if this user alone could have written it; a bad file is
logged and replaced by a fresh book rather than trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterable

import structlog

from metal_agent.core.stable_ports import BadBook, PortBook

log = structlog.get_logger(__name__)

FILE_NAME = "front-door-ports.json"
MAX_BYTES = 1024 * 1024


class PortBookFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME

    def load(self) -> PortBook:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return PortBook()
        except OSError as err:
            log.warning("ignoring the stable-port book", file=str(self.path), why=str(err))
            return PortBook()
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                log.warning("ignoring the stable-port book: others could have written it", file=str(self.path))
                return PortBook()
            text = f.read(MAX_BYTES + 1)
        try:
            return PortBook.from_json(json.loads(text))
        except (ValueError, BadBook) as err:
            log.warning("ignoring a stable-port book that is not one", file=str(self.path), why=str(err))
            return PortBook()

    def save(self, book: PortBook) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ports-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(book.to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def free_port(host: str, avoid: Iterable[int] = ()) -> int:
    """A port nothing listens on at `host` now, and none of `avoid` (held by other services
    whose front-door listener may be down for a moment)."""
    avoid = set(avoid)
    for _ in range(64):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise OSError(f"no free port found on {host}")
