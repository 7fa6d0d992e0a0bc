"""Waking a sleeping model: the front door tells the agent a request is waiting for it.

A request for a route in state `sleeping` is held like one for a starting
engine (the gate's queue, within the queue timeout); what differs is that
nothing would start the engine on its own, so the front door asks the agent
(`POST /wake {"key"}` on its `agent.sock`). One call per route at a time: a
burst of requests for a cold model costs the agent one wake (a wake of a model
already loading is answered at once, and is idempotent), and an agent that was
restarting when the first one was sent is asked again by the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("metal_agent.frontdoor")


class AgentWaker:
    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self._socket_path = socket_path
        self._timeout = timeout
        self._session: Any = None
        self._pending: dict[str, asyncio.Task] = {}
        self.sent = 0  # wakes sent (tests and the log)

    def wake(self, key: str) -> None:
        """A request is waiting for `key`: ask the agent to load it. Never blocks, never raises."""
        if key in self._pending:
            return
        task = asyncio.get_running_loop().create_task(self._post(key))
        self._pending[key] = task
        task.add_done_callback(lambda _t, k=key: self._pending.pop(k, None))

    async def _post(self, key: str) -> None:
        import aiohttp

        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(self._socket_path)),
                    timeout=aiohttp.ClientTimeout(total=self._timeout))
            async with self._session.post("http://agent/wake", json={"key": key}) as resp:
                body = await resp.read()
            self.sent += 1
            if resp.status != 200:
                log.warning("front door: the agent refused to wake %s: HTTP %d %s", key, resp.status, body[:200])
            else:
                state = json.loads(body).get("state")
                (log.info if state == "loading" else log.debug)("front door: asked the agent to load %s (%s)", key, state)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as err:
            # The agent is away (restarting): the held request's next sibling asks again.
            log.warning("front door: could not ask the agent to load %s: %s", key, err)

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
