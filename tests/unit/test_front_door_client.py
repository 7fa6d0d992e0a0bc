"""The front door client over a real Unix socket. The server here is a tiny aiohttp app
standing in for the front door's control socket (fd-proxy's `metal_agent/frontdoor/` was not
on main when this was written); it speaks the protocol of brief-fd-common.md."""

from __future__ import annotations

import pytest
from aiohttp import web

from metal_agent.adapters.front_door_client import FrontDoorClient, FrontDoorUnavailable


@pytest.fixture
async def stand_in(tmp_path):
    got: dict = {}

    async def put_table(request: web.Request) -> web.Response:
        table = await request.json()
        if not isinstance(table.get("version"), int):
            return web.Response(status=400, text="no version")
        got["table"] = table
        return web.Response(status=204)

    async def state(_: web.Request) -> web.Response:
        version = got.get("table", {}).get("version", 0)
        return web.json_response({"version": version, "routes": {"ns/a": {"inflight": 1, "queued": 2,
                                                                          "last_request": None}}})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="# TYPE front_door_requests_total counter\nfront_door_requests_total 3\n")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_put("/table", put_table)
    app.router.add_get("/state", state)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "front-door.sock"
    await web.UnixSite(runner, str(path)).start()
    yield path, got
    await runner.cleanup()


async def test_put_table_state_metrics_and_health(stand_in):
    path, got = stand_in
    client = FrontDoorClient(path)
    await client.put_table({"version": 3, "routes": []})
    assert got["table"] == {"version": 3, "routes": []}
    assert (await client.state())["version"] == 3
    assert (await client.state())["routes"]["ns/a"]["queued"] == 2
    assert "front_door_requests_total 3" in await client.metrics()
    assert await client.healthy()


async def test_a_refused_table_and_a_missing_socket_are_unavailable(stand_in, tmp_path):
    path, _ = stand_in
    with pytest.raises(FrontDoorUnavailable, match="HTTP 400"):
        await FrontDoorClient(path).put_table({"version": "x"})
    nobody = FrontDoorClient(tmp_path / "nobody.sock", timeout=0.5)
    with pytest.raises(FrontDoorUnavailable):
        await nobody.state()
    assert not await nobody.healthy()
