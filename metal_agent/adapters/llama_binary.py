"""What the installed llama-server is: its version and the flag dialect it speaks.

Asked once at start-up (`--version`, `--help`), so every command line the
agent builds uses spellings this exact binary accepts (see
`core.flags.Dialect`: the mlock spelling, the log-verbosity option the
acceleration report depends on, `--no-jinja`).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass

from metal_agent.core.flags import Dialect, MlockStyle, dialect_from_help
from metal_agent.tasks import within


class LlamaServerMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class LlamaServerInfo:
    path: str
    version: str
    dialect: Dialect

    @property
    def mlock_style(self) -> MlockStyle:
        return self.dialect.mlock_style


async def _output(argv: list[str], timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await within(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode(errors="replace")


async def probe(path: str, timeout: float = 20.0) -> LlamaServerInfo:
    if not path or not os.access(path, os.X_OK):
        raise LlamaServerMissing(
            f"llama-server not found or not executable at {path or '(none)'}: "
            "install llama.cpp (brew install llama.cpp) or pass --llama-server PATH"
        )
    version_text = await _output([path, "--version"], timeout)
    match = re.search(r"version:\s*(\S+(?:\s*\([^)]*\))?)", version_text)
    help_text = await _output([path, "--help"], timeout)
    return LlamaServerInfo(path, match.group(1) if match else "unknown", dialect_from_help(help_text))
