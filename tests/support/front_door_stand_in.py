"""A stand-in front door process for the agent side's tests: fd-proxy's real one
(`metal-agent front-door`) was not on main when the agent side was written. It serves the
control socket of brief-fd-common.md (PUT /table, GET /state, /metrics, /healthz), keeps the
last table in the state dir (`front-door-table.json`, the real one's file name) and serves its
version after a restart, like the real one. It proxies nothing. Run: python -m tests.support.front_door_stand_in --socket S --state-dir D."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    saved = Path(args.state_dir) / "front-door-table.json"
    table = json.loads(saved.read_text()) if saved.exists() else {"version": 0, "routes": []}

    async def put_table(request: web.Request) -> web.Response:
        nonlocal table
        table = await request.json()
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, saved)
        return web.Response(status=204)

    async def state(_: web.Request) -> web.Response:
        return web.json_response({"version": table.get("version", 0), "routes": {
            r["key"]: {"inflight": 0, "queued": 0, "last_request": None} for r in table.get("routes", [])},
            "pid": os.getpid()})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=f"# TYPE stand_in_front_door_routes gauge\n"
                                 f"stand_in_front_door_routes {len(table.get('routes', []))}\n")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def serve() -> None:
        app = web.Application()
        app.router.add_put("/table", put_table)
        app.router.add_get("/state", state)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app)
        await runner.setup()
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        await web.UnixSite(runner, args.socket).start()
        os.chmod(args.socket, 0o600)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
