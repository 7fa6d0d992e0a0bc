"""The agent's side of the front door's control socket (HTTP over a Unix socket).

`PUT /table` hands the front door its routing table, `GET /state` reads what
it serves (version, in flight, queued), `GET /metrics` its Prometheus text.
Every call has a short timeout: the front door being away must never hold the
agent up, it only means the table is pushed again when it is back.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp


class FrontDoorUnavailable(Exception):
    """The front door did not answer (not running, restarting) or answered with an error."""


class FrontDoorClient:
    def __init__(self, socket_path: Path, *, timeout: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(self, method: str, path: str, *, json: dict | None = None, want: str = "json"):
        try:
            connector = aiohttp.UnixConnector(path=str(self.socket_path))
            async with aiohttp.ClientSession(connector=connector, timeout=self.timeout) as session:
                async with session.request(method, f"http://front-door{path}", json=json) as resp:
                    if resp.status >= 300:
                        body = (await resp.text())[:200]
                        raise FrontDoorUnavailable(f"{method} {path}: HTTP {resp.status} {body}")
                    if want == "json":
                        return await resp.json(content_type=None)
                    if want == "text":
                        return await resp.text()
                    return None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
            raise FrontDoorUnavailable(f"{method} {path}: {type(err).__name__}: {err}") from None

    async def put_table(self, table: dict) -> None:
        await self._call("PUT", "/table", json=table, want="none")

    async def state(self) -> dict:
        found = await self._call("GET", "/state")
        if not isinstance(found, dict):
            raise FrontDoorUnavailable("GET /state: not a JSON object")
        return found

    async def metrics(self) -> str:
        return await self._call("GET", "/metrics", want="text")

    async def put_power(self, start: float, end: float, joules: float) -> None:
        await self._call("PUT", "/power", json={"start": start, "end": end, "joules": joules}, want="none")

    async def healthy(self) -> bool:
        try:
            await self._call("GET", "/healthz", want="none")
        except FrontDoorUnavailable:
            return False
        return True
