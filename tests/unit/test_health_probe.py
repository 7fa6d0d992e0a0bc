"""The supervisor's kept-alive health probe against real servers on loopback: one that keeps
connections open, one that closes after each answer, one that stops answering."""

from __future__ import annotations

import asyncio

from aiohttp import web

from metal_agent.adapters.process.health_probe import HealthProbe
from tests.support.slowness import scaled


async def serve(handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/health", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def test_reuses_one_connection_and_reads_the_status():
    peers: list = []
    status = [200]

    async def health(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response({"status": "ok" if status[0] == 200 else "loading model"}, status=status[0])

    runner, port = await serve(health)
    probe = HealthProbe("127.0.0.1", port)
    try:
        assert [await probe(1.0) for _ in range(5)] == [True] * 5
        status[0] = 503
        assert await probe(1.0) is False
        assert len(set(peers)) == 1  # one connection for all six requests
    finally:
        probe.close()
        await runner.cleanup()


async def test_a_server_that_closes_after_each_answer_is_reconnected():
    peers: list = []

    async def health(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok", headers={"Connection": "close"})

    runner, port = await serve(health)
    probe = HealthProbe("127.0.0.1", port)
    try:
        assert [await probe(1.0) for _ in range(3)] == [True] * 3
        assert len(set(peers)) == 3
    finally:
        probe.close()
        await runner.cleanup()


async def test_a_server_that_stops_answering_fails_within_the_timeout_and_recovers():
    hang = asyncio.Event()
    release = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        if hang.is_set():
            await release.wait()
        return web.Response(text="ok")

    runner, port = await serve(health)
    probe = HealthProbe("127.0.0.1", port)
    try:
        assert await probe(1.0)
        hang.set()
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await probe(0.2) is False
        assert loop.time() - began < scaled(1.0)
        hang.clear()
        release.set()
        assert await probe(1.0)  # a new connection: the old one may still owe an answer
    finally:
        probe.close()
        await runner.cleanup()


async def test_nothing_listening_is_unhealthy_not_an_error():
    probe = HealthProbe("127.0.0.1", 9)  # discard port: nothing listens on loopback here
    assert await probe(0.5) is False


async def test_a_kept_connection_the_server_closed_while_idle_is_not_a_failure():
    """llama-server closes a kept connection after 5 s idle, the liveness interval: the probe
    that finds it closed asks again on a fresh one instead of calling the server unhealthy."""
    from tests.support.wait import wait_for

    peers: list = []

    async def health(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    probe = HealthProbe("127.0.0.1", site._server.sockets[0].getsockname()[1])
    try:
        assert await probe(1.0)
        reader = probe._conn[0]
        await wait_for(lambda: _true(reader.at_eof()), timeout=5, what="the server to close the idle connection")
        assert await probe(1.0)  # found closed, asked again on a new connection
        assert len(set(peers)) == 2
    finally:
        probe.close()
        await runner.cleanup()


async def _true(value: bool) -> bool:
    return value
