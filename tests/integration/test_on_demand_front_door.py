"""The front door's side of load on demand: the real front door process, the agent's real socket
(adapters/agent_socket.py) answering its wakes, and the real llama-server it then routes to.

A request for a `sleeping` route is held and wakes the agent once (a burst of requests costs one
wake); the table that gives the route its engine releases every held request; `GET /state`
reports each route's last activity (arrival or end of a request), the idle clock's input.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from metal_agent.adapters.agent_socket import AgentSocket
from tests.support.front_door import route, running_front_door, table
from tests.support.llama import running_llama_server
from tests.support.ports import free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
async def llama(llama_server_bin, tiny_model):
    port = free_port()
    argv = [str(llama_server_bin), "--model", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "256", "--threads", "1", "--parallel", "1"]
    async with running_llama_server(argv, port=port) as server:
        yield server


async def test_a_request_for_a_sleeping_route_wakes_the_agent_once_and_is_served_when_it_loads(tmp_path, llama):
    woken: list[str] = []
    answer = asyncio.Event()

    async def wake(key: str) -> str:
        woken.append(key)
        await answer.wait()  # the agent answers once the burst is in: one wake in flight per route
        return "loading"

    agent = AgentSocket(tmp_path / "agent.sock", waker=wake)
    await agent.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    try:
        async with running_front_door(tmp_path) as door, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30)) as http:
            await door.put_table(table(1, [route("ns/cold", port, None, state="sleeping")]))

            async def ask() -> int:
                async with http.post(url, json=SHORT) as resp:
                    await resp.read()
                    return resp.status

            held = [asyncio.ensure_future(ask()) for _ in range(3)]
            await wait_for(lambda: _queued(door, 3), timeout=10, what="three requests held")
            await wait_for(lambda: woken, timeout=10, what="the agent woken")
            assert woken == ["ns/cold"]  # three requests, one wake
            answer.set()
            assert not any(h.done() for h in held)
            before = time.time()
            await door.put_table(table(2, [route("ns/cold", port, llama.base_url.removeprefix("http://"))]))
            assert await asyncio.wait_for(asyncio.gather(*held), 20) == [200, 200, 200]
            state = await door.route_state("ns/cold")
            assert state["inflight"] == 0 and state["queued"] == 0
            assert state["last_active"] >= before >= state["last_request"]  # the end of the last one counts
    finally:
        await agent.close()


async def test_an_agent_that_is_away_is_asked_again_by_the_next_request(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    woken: list[str] = []

    async def wake(key: str) -> str:
        woken.append(key)
        return "loading"

    async with running_front_door(tmp_path) as door, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30)) as http:
        await door.put_table(table(1, [route("ns/cold", port, None, state="sleeping", queue_timeout_s=0.5)]))
        async with http.post(url, json=SHORT) as resp:  # no agent socket yet: held, then 503
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "model_unavailable"
        agent = AgentSocket(tmp_path / "agent.sock", waker=wake)
        await agent.start()
        try:
            async with http.post(url, json=SHORT) as resp:
                assert resp.status == 503
            assert woken == ["ns/cold"]
            assert "could not ask the agent to load ns/cold" in door.log()
        finally:
            await agent.close()


async def _queued(door, n: int) -> bool:
    return (await door.route_state("ns/cold")).get("queued") == n
