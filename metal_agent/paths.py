"""Where the agent keeps its files, by platform convention (never /tmp).

macOS: models are a cache (~/Library/Caches), logs go where Console.app
looks (~/Library/Logs), state that must survive restarts lives in
~/Library/Application Support. Linux (development, CI): the XDG equivalents.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

APP = "metal-agent"


@dataclass(frozen=True)
class AgentPaths:
    models: Path
    logs: Path
    state: Path


def default_paths(home: Path | None = None, platform: str = sys.platform) -> AgentPaths:
    home = home or Path.home()
    if platform == "darwin":
        lib = home / "Library"
        return AgentPaths(lib / "Caches" / APP / "models", lib / "Logs" / APP, lib / "Application Support" / APP)

    def xdg(var: str, fallback: str) -> Path:
        value = os.environ.get(var)
        return Path(value) if value and os.path.isabs(value) else home / fallback

    return AgentPaths(
        xdg("XDG_CACHE_HOME", ".cache") / APP / "models",
        xdg("XDG_STATE_HOME", ".local/state") / APP / "logs",
        xdg("XDG_STATE_HOME", ".local/state") / APP,
    )


HOMEBREW_BIN_DIRS = ("/opt/homebrew/bin", "/usr/local/bin")


def find_llama_server(explicit: str | None = None) -> str | None:
    """The llama-server to run: an explicit path, then Homebrew (Apple Silicon, Intel), then PATH."""
    import shutil

    if explicit:
        return explicit
    for directory in HOMEBREW_BIN_DIRS:
        candidate = Path(directory) / "llama-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("llama-server")
