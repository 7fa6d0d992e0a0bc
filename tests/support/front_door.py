"""The real front door process (`metal-agent front-door`) for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for


@dataclass
class FrontDoorProcess:
    process: ManagedProcess
    socket: Path
    state_dir: Path

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)),
                                     timeout=aiohttp.ClientTimeout(total=10))

    async def put_table(self, table: Any) -> tuple[int, str]:
        async with self._session() as http:
            async with http.put("http://fd/table", json=table) as resp:
                return resp.status, await resp.text()

    async def state(self) -> dict[str, Any]:
        async with self._session() as http:
            async with http.get("http://fd/state") as resp:
                assert resp.status == 200
                return await resp.json()

    async def metrics(self) -> str:
        async with self._session() as http:
            async with http.get("http://fd/metrics") as resp:
                assert resp.status == 200
                return await resp.text()

    async def healthy(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            async with self._session() as http:
                async with http.get("http://fd/healthz") as resp:
                    return resp.status == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def route_state(self, key: str) -> dict[str, Any]:
        return (await self.state())["routes"].get(key, {})

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


async def start_front_door(state_dir: Path, *, grace: float = 10) -> FrontDoorProcess:
    socket = state_dir / "front-door.sock"
    argv = [sys.executable, "-m", "metal_agent", "front-door", "--socket", str(socket),
            "--state-dir", str(state_dir), "--grace", str(grace), "--log-format", "console"]
    process = ManagedProcess("front-door", argv, state_dir / "front-door.log")
    await process.start()
    door = FrontDoorProcess(process, socket, state_dir)

    async def up() -> bool:
        if not process.running:
            raise RuntimeError(f"the front door exited:\n{door.log()}")
        return await door.healthy()

    await wait_for(up, timeout=30, what="the front door's /healthz", on_timeout=door.log)
    return door


@contextlib.asynccontextmanager
async def running_front_door(state_dir: Path, *, grace: float = 10) -> AsyncIterator[FrontDoorProcess]:
    door = await start_front_door(state_dir, grace=grace)
    try:
        yield door
    finally:
        await door.process.stop(grace=grace + 5)


def table(version: int, routes: list[dict[str, Any]], *, client_port: int = 0,
          listen_host: str = "127.0.0.1") -> dict[str, Any]:
    return {"version": version, "listen_host": listen_host, "client_port": client_port, "routes": routes}


def route(key: str, port: int, upstream: str | None, *, state: str = "serving", max_inflight: int = 4,
          queue: int = 8, queue_timeout_s: float = 20.0) -> dict[str, Any]:
    return {"key": key, "model": key.split("/")[1], "port": port, "upstream": upstream, "state": state,
            "max_inflight": max_inflight, "queue": queue, "queue_timeout_s": queue_timeout_s}


async def settle(coro_factory, timeout: float = 10):
    """Await with a bound, so a hung proxy fails the test instead of the suite."""
    return await asyncio.wait_for(coro_factory, timeout)


def handed(state_dir: Path, key: str) -> dict[str, Any] | None:
    """The route `key` serving in the table the front door was last handed (it keeps it in
    `front-door-table.json` under the agent's state dir), or None."""
    import json

    path = state_dir / "front-door-table.json"
    routes = json.loads(path.read_text())["routes"] if path.exists() else []
    return next((r for r in routes if r["key"] == key and r["state"] == "serving"), None)


async def accepting(host: str, port: int) -> bool:
    """Does something accept TCP connections on host:port? (The front door persists a table a moment
    before it binds the table's ports.)"""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    return True
