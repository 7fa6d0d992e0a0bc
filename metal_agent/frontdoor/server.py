"""The front door process: control socket, listeners, the persisted table, shutdown.

The agent pushes tables to `PUT /table` on a 0600 Unix socket; each accepted
table is written to the state dir before it is acknowledged, so a restarted
front door serves the last table at once, before the agent is back. Listeners
follow the table: one per route on `listen_host:<port>`, the client port on
loopback only, opened and closed as routes come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web
from prometheus_client import generate_latest

from metal_agent.core.front_door import Table, TableError, parse_table
from metal_agent.frontdoor.access import Access
from metal_agent.frontdoor.metrics import FrontDoorMetrics
from metal_agent.frontdoor.proxy import Proxy

log = logging.getLogger("metal_agent.frontdoor")

TABLE_FILE = "front-door-table.json"
Bind = tuple[str, int]


class FrontDoor:
    def __init__(self, state_dir: Path, socket_path: Path, access: Access, *, grace_s: float = 30.0,
                 wake: Callable[[str], None] | None = None) -> None:
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.grace_s = grace_s
        self.metrics = FrontDoorMetrics()
        self.proxy = Proxy(self.metrics, access)
        if wake is not None:
            self.proxy.wake = wake
        self._listeners: dict[Bind, tuple[str | None, asyncio.AbstractServer]] = {}
        self.listen_errors: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()

    # -- table ---------------------------------------------------------------------------------

    def load_persisted(self) -> Table | None:
        path = self.state_dir / TABLE_FILE
        try:
            return parse_table(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TableError) as err:
            log.warning("front door: ignoring the persisted table %s: %s", path, err)
            return None

    def _persist(self, table: Table) -> None:
        path = self.state_dir / TABLE_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(table.to_json(), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    async def apply(self, table: Table, *, persist: bool = True) -> None:
        async with self._lock:
            self.proxy.access.apply(table)  # may refuse the table (TableError): before anything else
            # Served first, then written (still before the agent hears it was accepted): an engine
            # that just became ready is routable without waiting on an fsync; a crash in between
            # restarts on the previous table, and the agent sends this one again.
            self.proxy.apply(table)
            await self._sync_listeners(table)
            if persist:
                await asyncio.to_thread(self._persist, table)
            log.info("front door: serving table version %d (%d routes)", table.version, len(table.routes))

    async def _sync_listeners(self, table: Table) -> None:
        want: dict[Bind, str | None] = {(table.listen_host, r.port): r.key for r in table.routes}
        if table.client_port:
            want[("127.0.0.1", table.client_port)] = None
        for bind, (target, server) in list(self._listeners.items()):
            if want.get(bind, "\0") != target:
                server.close()
                del self._listeners[bind]
        self.listen_errors = {}
        for bind, target in want.items():
            if bind in self._listeners:
                continue
            try:
                server = await asyncio.get_running_loop().create_server(
                    lambda t=target: self.proxy.protocol(t), bind[0], bind[1], reuse_address=True, backlog=1024)
            except OSError as err:
                name = target or "client port"
                self.listen_errors[name] = f"{bind[0]}:{bind[1]}: {err.strerror or err}"
                log.warning("front door: cannot listen for %s on %s:%d: %s", name, bind[0], bind[1], err)
                continue
            self._listeners[bind] = (target, server)

    # -- control socket ------------------------------------------------------------------------

    def control_app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_put("/table", self._put_table)
        app.router.add_get("/state", self._get_state)
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_put("/power", self._put_power)
        return app

    async def _put_table(self, request: web.Request) -> web.StreamResponse:
        try:
            await self.apply(parse_table(json.loads(await request.read())))
        except (ValueError, TableError) as err:
            self.metrics.tables_refused.inc()
            log.warning("front door: refused a table (the previous one keeps serving): %s", err)
            return web.json_response({"error": str(err)}, status=400)
        return web.Response(status=204)

    async def _get_state(self, request: web.Request) -> web.StreamResponse:
        proxy = self.proxy
        routes: dict[str, Any] = {
            key: {"inflight": g.inflight, "queued": g.queued, "last_request": g.last_request,
                  "last_active": g.last_active, "state": g.route.state.value, "ejected": g.ejected}
            for key, g in proxy.gates.items()}
        return web.json_response({"version": proxy.table.version, "routes": routes,
                                  "listen_errors": self.listen_errors})

    async def _get_metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _put_power(self, request: web.Request) -> web.StreamResponse:
        """One power window from the agent (monotonic start and end, joules): split across the
        requests that were in flight in it (frontdoor/energy.py says how)."""
        try:
            body = json.loads(await request.read())
            start, end, joules = (float(body[k]) for k in ("start", "end", "joules"))
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "expected {\"start\", \"end\", \"joules\"} numbers"}, status=400)
        for key, share in self.proxy.energy.split(start, end, joules, time.monotonic()).items():
            svc = self.proxy.service.get(key)
            if svc is not None:
                svc.energy.inc(share)
        return web.Response(status=204)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        table = self.load_persisted()
        if table is not None:
            try:
                await self.apply(table, persist=False)
            except TableError as err:
                log.warning("front door: ignoring the persisted table: %s", err)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._runner = web.AppRunner(self.control_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(self.socket_path)).start()
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)

    async def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace), then close."""
        self.proxy.draining = True
        for _target, server in self._listeners.values():
            server.close()
        self.proxy.close_idle()
        try:
            await asyncio.wait_for(self.proxy.wait_quiet(), self.grace_s)
        except asyncio.TimeoutError:
            log.warning("front door: %d requests still in flight after %.0fs; closing", self.proxy.active,
                        self.grace_s)
        self._listeners.clear()
        self.proxy.pool.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        log.info("front door: control socket %s", self.socket_path)
        await self._stop.wait()
        await self.shutdown()
