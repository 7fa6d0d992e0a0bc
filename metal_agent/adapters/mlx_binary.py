"""Where `mlx_lm.server` is, how to start it, and which mlx-lm it belongs to.

`mlx_lm.server` is a Python console script, not a binary. Started through
its `#!` line, the process's command line becomes `python3 mlx_lm.server
...`, which is not the argv the agent recorded, and an agent restart could
not prove the process is the one it started (adoption compares the two).
So the agent runs the interpreter itself: `exec_form` turns the script into
`(interpreter, script)`, and the recorded argv is exactly the command line.

Search order (`find_mlx_server`): an explicit path (`--mlx-server`; not the
Go agent's `--mlx-server-bin`, which names the Swift mlx-server, another CLI),
the agent's own venv (`pip install mlx-lm` beside metal-agent), Homebrew's
bin directories, then PATH.
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
#: Prints mlx_lm/server.py without importing mlx_lm (find_spec of a top-level package does not run it):
#: its add_argument literals are exactly the options `--help` lists (compared in the wheels of 0.28.0 to
#: 0.32.2), read in a tenth of a second where `--help` imports MLX (seconds of CPU at every start).
SOURCE_CODE = ("import importlib.util as u, os, sys\n"
               "s = u.find_spec('mlx_lm')\n"
               "p = os.path.join(os.path.dirname(s.origin), 'server.py') if s and s.origin else ''\n"
               "sys.stdout.write(open(p, encoding='utf-8').read() if p and os.path.isfile(p) else '')\n")


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


async def _output(argv: tuple[str, ...], timeout: float) -> str:
    """What `argv` prints ("" when it cannot be run, fails or takes longer than `timeout`)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
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
    """The options the server accepts, so that command lines carry only those (see core.mlx_dialect):
    read from its source by its interpreter (`SOURCE_CODE`), else from `--help` (an MLX import)."""
    if len(info.command) == 2:
        found = mlx_dialect_from_help(await _output((info.command[0], "-c", SOURCE_CODE), timeout), info.version)
        if found.options is not None:
            return found
    return mlx_dialect_from_help(await _output((*info.command, "--help"), timeout), info.version)
