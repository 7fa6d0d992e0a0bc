"""Run the real llama-server in tests and wait until it serves.

The readiness wait races the process's exit against `/health`, so a server
that dies during load fails the test at once with its own stderr, instead of
after a timeout with nothing to go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import aiohttp

from tests.support.procs import ManagedProcess


class LlamaServerExited(Exception):
    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"llama-server exited with code {returncode}:\n{stderr[-4000:]}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass
class RunningLlamaServer:
    process: ManagedProcess
    base_url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")


async def _healthy(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def wait_healthy(process: ManagedProcess, base_url: str, timeout: float) -> None:
    """Poll /health until 200; raise LlamaServerExited if the process dies first."""
    assert process.proc is not None
    exited = asyncio.ensure_future(process.proc.wait())
    try:
        async with aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not await _healthy(http, base_url):
                if exited.done():
                    raise LlamaServerExited(exited.result(), process.log_path.read_text(errors="replace"))
                if loop.time() > deadline:
                    raise TimeoutError(f"llama-server not healthy after {timeout}s\n{process.tail()}")
                await asyncio.wait({exited}, timeout=0.05)
    finally:
        if not exited.done():
            exited.cancel()


@contextlib.asynccontextmanager
async def running_llama_server(
    argv: Sequence[str], *, port: int, host: str = "127.0.0.1", startup_timeout: float = 60
) -> AsyncIterator[RunningLlamaServer]:
    """Start `argv` (argv[0] is the binary), wait for /health 200, stop on exit."""
    with tempfile.TemporaryDirectory(prefix="llama-") as tmp:
        process = ManagedProcess("llama-server", argv, Path(tmp) / "llama-server.log")
        await process.start()
        try:
            base_url = f"http://{host}:{port}"
            await wait_healthy(process, base_url, startup_timeout)
            yield RunningLlamaServer(process, base_url)
        finally:
            await process.stop(grace=5)
