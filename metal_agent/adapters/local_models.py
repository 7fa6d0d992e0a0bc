"""A model already on this Mac: whether it can be served, and reading it (blocking; use in a thread).

Why its own module: `adapters.model_files` decides where a Model's file
comes from (in place, or downloaded); this is the part that touches a local
file or directory: the checks that say why it cannot be served (missing, a
directory where a file is needed, refused by macOS privacy protection), and
`LocalModel`, the reader the engines' estimates and the GGUF header use.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path, PurePosixPath

from metal_agent.core.engines.llama_server import HEADER_FIRST_READ, HEADER_MAX_READ, read_header
from metal_agent.core.gguf_header import GGUFError, GGUFHeader
from metal_agent.core.status import Blocker


# Folders of the home that macOS privacy protection (TCC) keeps from processes
# launchd starts: open(2) and stat(2) fail with EPERM ("Operation not
# permitted") unless the process was granted access, which an agent started
# by launchd never is by a dialog (nobody sees it). Volumes in /Volumes
# (external disks, network shares) are protected the same way.
PRIVACY_PROTECTED_FOLDERS = ("Desktop", "Documents", "Downloads")


def privacy_protected_folder(path: Path | str, home: Path | str | None = None) -> str | None:
    """The TCC-protected place `path` is in ("~/Downloads", "/Volumes/Models"), or None.

    Both the path as written and where its symlinks lead are checked: a
    link from an open folder into ~/Downloads is refused all the same. The
    volume check uses only the resolved path, because "/Volumes/Macintosh
    HD" is a link to the (unprotected) boot volume.
    """
    home_dir = PurePosixPath(os.path.abspath(home if home is not None else Path.home()))
    written, resolved = PurePosixPath(os.path.abspath(path)), PurePosixPath(os.path.realpath(path))
    for candidate in (written, resolved):
        for name in PRIVACY_PROTECTED_FOLDERS:
            folder = home_dir / name
            if candidate == folder or folder in candidate.parents:
                return f"~/{name}"
    parts = resolved.parts
    if len(parts) >= 3 and parts[1] == "Volumes":
        return f"/Volumes/{parts[2]}"
    return None


def privacy_hint(path: Path | str, home: Path | str | None = None) -> str | None:
    """What to tell the user when the file at `path` could not be opened, if TCC is the likely cause."""
    folder = privacy_protected_folder(path, home)
    if folder is None:
        return None
    where = f"the volume {folder}" if folder.startswith("/Volumes/") else folder
    python = os.path.realpath(sys.executable)
    return (f"{where} is protected by macOS privacy protection (TCC), which refuses it to processes "
            f"started by launchd unless they have Full Disk Access. Fix: move the model out of {where} "
            f"(e.g. into ~/Library/Caches/metal-agent/models, or any folder outside Desktop, Documents, "
            f"Downloads and external volumes) and update spec.source, or grant Full Disk Access "
            f"(System Settings > Privacy & Security > Full Disk Access) to the agent's Python ({python}) "
            f"and to llama-server (its path is in `metal-agent doctor`), then restart the agent")


def _unreadable(path: Path, err: OSError) -> Blocker:
    hint = privacy_hint(path) if isinstance(err, PermissionError) else None
    if hint is not None:
        return Blocker("ModelUnreadable", f"model file {path}: {err.strerror}: {hint}")
    if isinstance(err, PermissionError):
        return Blocker("ModelUnreadable", f"model file {path} is not readable by the agent's user: {err.strerror}")
    return Blocker("ModelUnreadable", f"model file {path}: {err.strerror}")


_GGUF_MAGIC = b"GGUF"
_DIRECTORY_MODEL = "an MLX model is a directory holding config.json, *.safetensors weights and tokenizer files"


def check_local_dir(path: Path) -> Blocker | None:
    """Why the MLX model directory at `path` cannot be served, or None (a few stats and one open)."""
    try:
        st = path.stat()
        if not stat.S_ISDIR(st.st_mode):
            with path.open("rb") as f:
                magic = f.read(4)
            if magic == _GGUF_MAGIC:
                return Blocker("ModelSourceInvalid", f"{path} is a GGUF file, not an MLX model directory; set the"
                               " Model's spec.format to gguf to serve it with llama-server")
            return Blocker("ModelSourceInvalid", f"{path} is a file; {_DIRECTORY_MODEL}")
        names = set(os.listdir(path))
    except FileNotFoundError:
        return Blocker("ModelNotFound", f"model directory {path} does not exist on this Mac")
    except OSError as err:
        return _unreadable(path, err)
    if "config.json" not in names:
        return Blocker("ModelSourceInvalid", f"{path} has no config.json; {_DIRECTORY_MODEL}")
    if not any(n.endswith(".safetensors") for n in names):
        return Blocker("ModelSourceInvalid", f"{path} has no *.safetensors weights; {_DIRECTORY_MODEL}")
    try:
        os.close(os.open(path / "config.json", os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except OSError as err:
        return _unreadable(path, err)
    return None


class LocalModel:
    """`core.engine.ModelReader` over a model file or directory on this Mac (blocking: use in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def explain(self, err: OSError) -> str:
        hint = privacy_hint(self.path) if isinstance(err, PermissionError) else None
        return f"{err.strerror or err}" + (f": {hint}" if hint else "")

    def _file(self, name: str) -> Path:
        return self.path / name if name else self.path

    def names(self) -> list[str]:
        if not self.path.is_dir():
            return [""]
        return sorted(entry.name for entry in os.scandir(self.path) if entry.is_file())

    def size(self, name: str) -> int:
        return self._file(name).stat().st_size

    def read(self, name: str, offset: int, length: int) -> bytes:
        with self._file(name).open("rb") as f:
            f.seek(offset)
            return f.read(length)


def check_local_file(path: Path) -> Blocker | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return Blocker("ModelNotFound", f"model file {path} does not exist on this Mac")
    except OSError as err:
        return _unreadable(path, err)
    if stat.S_ISDIR(st.st_mode):
        return Blocker("ModelSourceInvalid", f"{path} is a directory; llama-server needs a single .gguf file")
    if not stat.S_ISREG(st.st_mode):
        return Blocker("ModelSourceInvalid", f"{path} is not a regular file")
    # Open it rather than ask access(2): access answers from the mode bits for
    # the real uid and says yes to a file TCC refuses; open is what llama-server meets.
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except OSError as err:
        return _unreadable(path, err)
    return None


def read_gguf_header(path: Path, first: int = HEADER_FIRST_READ, limit: int = HEADER_MAX_READ) -> tuple[GGUFHeader | GGUFError, int]:
    """Blocking: call through `asyncio.to_thread`. Never reads past the metadata
    (plus the slack of the last read) and never more than `limit` bytes."""
    return read_header(LocalModel(path), first, limit)
