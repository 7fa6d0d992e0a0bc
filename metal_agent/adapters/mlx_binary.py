"""Where `mlx_lm.server` is, how to start it, and which mlx-lm it belongs to.

`mlx_lm.server` is a Python console script, not a binary. Started through
its `#!` line, the process's command line becomes `python3 mlx_lm.server
...`, which is not the argv the agent recorded, and an agent restart could
not prove the process is the one it started (adoption compares the two).
So the agent runs the interpreter itself: `exec_form` turns the script into
`(interpreter, script)`, and the recorded argv is exactly the command line.

Search order (`find_mlx_server`): an explicit path (`--mlx-server`, the Go
agent's `--mlx-server-bin`), the agent's own venv (`pip install mlx-lm`
beside metal-agent), Homebrew's bin directories, then PATH.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from metal_agent.core.mlx_dialect import MlxDialect, mlx_dialect_from_help
from metal_agent.paths import HOMEBREW_BIN_DIRS
from metal_agent.tasks import within

SCRIPT = "mlx_lm.server"
VERSION_CODE = "import importlib.metadata as m; print(m.version('mlx-lm'))"


def find_mlx_server(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    for directory in (str(Path(sys.executable).parent), *HOMEBREW_BIN_DIRS):
        candidate = Path(directory) / SCRIPT
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(SCRIPT)


def exec_form(path: str) -> tuple[str, ...]:
    """How to exec `path` so that the process's command line is what we pass (blocking: reads 256 bytes)."""
    try:
        with open(path, "rb") as f:
            first = f.read(256).split(b"\n", 1)[0]
    except OSError:
        return (path,)
    if not first.startswith(b"#!"):
        return (path,)
    words = first[2:].decode(errors="replace").split()
    if not words:
        return (path,)
    interpreter = words[0]
    if os.path.basename(interpreter) == "env" and len(words) > 1:
        found = shutil.which(words[1])
        if found is None:
            return (path,)
        interpreter = found
    return (interpreter, path)


@dataclass(frozen=True)
class MlxServerInfo:
    command: tuple[str, ...]
    version: str  # mlx-lm's version, "unknown" when the interpreter cannot say


async def _help(command: tuple[str, ...], timeout: float) -> str:
    """`mlx_lm.server --help`'s text ("" when it cannot be run or read)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, "--help", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return ""
    try:
        out, _ = await within(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as stopped:
        proc.kill()  # timed out, or start-up failed elsewhere: leave no child behind
        await asyncio.shield(proc.wait())
        if isinstance(stopped, asyncio.CancelledError):
            raise
        return ""
    return out.decode(errors="replace") if proc.returncode == 0 else ""


async def probe(path: str, timeout: float = 20.0) -> MlxServerInfo | str:
    """The command and mlx-lm version for `path`, or why it cannot be used."""
    if not os.access(path, os.X_OK):
        return f"{SCRIPT} not found or not executable at {path}"
    command = await asyncio.to_thread(exec_form, path)
    version = "unknown"
    if len(command) == 2:
        try:
            proc = await asyncio.create_subprocess_exec(
                command[0], "-c", VERSION_CODE, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                out, _ = await within(proc.communicate(), timeout)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                out = b""
            if proc.returncode == 0 and out.strip():
                version = out.decode(errors="replace").strip()
        except OSError:
            pass
    return MlxServerInfo(command, version)


async def probe_dialect(info: MlxServerInfo, timeout: float = 20.0) -> MlxDialect:
    """The options the server's --help lists (an MLX import: a second or two, once at start-up), so
    that command lines carry only what it accepts (see core.mlx_dialect)."""
    return mlx_dialect_from_help(await _help(info.command, timeout), info.version)
