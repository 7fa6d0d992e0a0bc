"""An engine that goes mid-request (a crash, a stop) costs the client nothing, once.

The front door holds a request whose engine hung up before a response head (nothing reached the
client, and a completion has nothing to undo) and sends it again to the engine that comes back;
it does that once only, so a request that kills every engine it reaches gets a 502 instead of
taking the next engine down too.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from tests.support.front_door import route, running_front_door, table
from tests.support.llama import running_llama_server
from tests.support.ports import free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
#: Non-streaming, so no response head until it is done: a second or more of generation on the tiny model.
LONG = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "ignore_eos": True}


def _argv(binary, model, port):
    return [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "2048", "--threads", "1", "--parallel", "1"]


async def _busy(http: aiohttp.ClientSession, base_url: str) -> bool:
    async with http.get(f"{base_url}/slots") as resp:
        return any(slot.get("is_processing") for slot in await resp.json())


async def test_a_request_in_flight_when_its_engine_is_killed_is_answered_by_the_restarted_one(
        tmp_path, llama_server_bin, tiny_model):
    engine, port = free_port(), free_port()
    argv = _argv(llama_server_bin, tiny_model, engine)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http, \
            running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, f"127.0.0.1:{engine}", queue_timeout_s=60)]))
        async with running_llama_server(argv, port=engine) as first:
            request = asyncio.ensure_future(http.post(f"http://127.0.0.1:{port}{CHAT}", json=LONG))
            await wait_for(lambda: _busy(http, first.base_url), timeout=30, what="the engine working on it")
            first.process.signal(signal.SIGKILL)  # a crash mid-request, before any response byte
            await first.process.proc.wait()
        assert not request.done()  # held, not answered 502
        async with running_llama_server(argv, port=engine):  # the supervisor's restart, same port
            async with await asyncio.wait_for(request, 90) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] == LONG["max_tokens"]
        assert 'outcome="ok",service="ns/tiny"} 1.0' in await door.metrics()


async def test_an_engine_that_hangs_up_on_every_try_is_a_502_after_one_replay(tmp_path):
    """Which request kills llama-server cannot be arranged on purpose, so the engine here is a
    listener that reads each completion request and hangs up without a word, as a crashing engine
    does on the wire; the point is how many times the front door tries. It answers /health, as the
    engine restarted after each crash does: the front door takes an engine that hung up out of
    rotation until /health answers (frontdoor/outlier.py), so one that never did would hold the
    request to its queue timeout (a 503) instead of showing the replay."""
    engine, port = free_port(), free_port()
    tries: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health "):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"status\":\"ok\"}")
            await writer.drain()
            writer.close()
            return
        tries.append(head)
        writer.transport.abort()  # a reset, as from a killed process

    server = await asyncio.start_server(hang_up, "127.0.0.1", engine)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http, \
                running_front_door(tmp_path) as door:
            await door.put_table(table(1, [route("ns/tiny", port, f"127.0.0.1:{engine}")]))
            async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=LONG) as resp:
                assert resp.status == 502
                assert (await resp.json())["error"]["code"] == "upstream_error"
            assert len(tries) == 2 and all(t.startswith(b"POST /v1/chat/completions") for t in tries)
    finally:
        server.close()
        await server.wait_closed()
