"""Find the GGUF file a Model names, on this Mac.

The reconciler asks `lookup()` and gets one of three answers without ever
waiting on I/O longer than a `stat`: the file is ready, it is on its way
(a download runs in the background and calls back when done), or it cannot
be had, with a reason the user can act on. Local sources (`file://`,
absolute paths) are used in place; sources that only make sense inside the
cluster (`pvc://`, `s3://`) are refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metal_agent.core.api import Model, SourceKind
from metal_agent.core.status import Blocker


@dataclass(frozen=True)
class ModelReady:
    path: Path


@dataclass(frozen=True)
class ModelPending:
    message: str


Lookup = ModelReady | ModelPending | Blocker


def _check_local_file(path: Path) -> Blocker | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return Blocker("ModelNotFound", f"model file {path} does not exist on this Mac")
    except OSError as err:
        return Blocker("ModelUnreadable", f"model file {path}: {err.strerror}")
    if stat.S_ISDIR(st.st_mode):
        return Blocker("ModelSourceInvalid", f"{path} is a directory; llama-server needs a single .gguf file")
    if not stat.S_ISREG(st.st_mode):
        return Blocker("ModelSourceInvalid", f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        return Blocker("ModelUnreadable", f"model file {path} is not readable by the agent's user")
    return None


class ModelFiles:
    def __init__(self, cache_dir: Path, on_ready: Callable[[str], None] | None = None) -> None:
        self.cache_dir = cache_dir
        self.on_ready = on_ready

    def lookup(self, model: Model) -> Lookup:
        source = model.spec.source
        if source.kind in (SourceKind.FILE, SourceKind.PATH):
            path = Path(source.local_path)
            return _check_local_file(path) or ModelReady(path)
        if source.kind in (SourceKind.PVC, SourceKind.S3):
            return Blocker("ModelSourceUnsupported",
                           f"{source.kind.value}:// sources live inside the cluster and are not available on a Mac; "
                           "use an https://, hf:// or file:// source")
        if source.kind is SourceKind.NAME:
            return Blocker("ModelSourceUnsupported",
                           f"source {source.raw!r} is a bare name; give an https://, hf:// or file:// source")
        return Blocker("ModelSourceUnsupported",
                       f"{source.kind.value} sources are not downloaded by this agent version yet; "
                       "download the file and use a file:// source")
