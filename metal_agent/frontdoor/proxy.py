"""The request path: route, authorize, wait for a slot, forward, relay.

One `Proxy` serves every listener; a listener only says which route it is (or
None for the client port, which routes by the body's `model`). Routes, gates
and metrics are swapped by `apply(table)` between requests, never under one.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from metal_agent.core import openai_errors
from metal_agent.core.front_door import EMPTY, Route, RouteState, Table, models_body
from metal_agent.frontdoor.access import Access
from metal_agent.frontdoor.cost import request_cost
from metal_agent.frontdoor.energy import EnergySplit
from metal_agent.frontdoor.gate import Gate, Refused
from metal_agent.frontdoor.http1 import BadRequest, ClientConn, Request, read_request, response_bytes, upstream_request
from metal_agent.frontdoor.metrics import FrontDoorMetrics, ServiceMetrics
from metal_agent.frontdoor.outlier import Outlier
from metal_agent.frontdoor.upstream import (
    ConnectFailed, Pool, Stalled, UpstreamBroken, UpstreamConn, client_head, discard, read_response_head, relay_body,
)

log = logging.getLogger("metal_agent.frontdoor")


def error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps(openai_errors.error_body(status, code, message)).encode()


class Proxy:
    def __init__(self, metrics: FrontDoorMetrics, access: Access, pool: Pool | None = None) -> None:
        self.metrics = metrics
        self.access = access
        self.pool = pool or Pool()
        self.table: Table = EMPTY
        self.gates: dict[str, Gate] = {}
        self.service: dict[str, ServiceMetrics] = {}
        self.outliers: dict[str, Outlier] = {}
        self.energy = EnergySplit()
        self.draining = False
        self.active = 0
        # Asks the agent to load a sleeping route's model (frontdoor/wake.py); set by the server.
        self.wake: Callable[[str], None] = lambda key: None
        self._idle_conns: set[ClientConn] = set()
        self._quiet = asyncio.Event()
        self._quiet.set()

    # -- table ---------------------------------------------------------------------------------

    def apply(self, table: Table) -> None:
        old = self.table
        for route in table.routes:
            gate = self.gates.get(route.key)
            before = old.by_key(route.key)
            if before is not None and before.upstream and before.upstream != route.upstream:
                self.pool.drop(before.upstream)
            if gate is None:
                gate = self.gates[route.key] = Gate(route)
                svc = self.service[route.key] = self.metrics.for_service(route.key)
                svc.queue_depth.set_function(lambda g=gate: g.queued)
                svc.inflight.set_function(lambda g=gate: g.inflight)
                self.outliers[route.key] = Outlier(route.key, gate, svc.ejections)
            elif gate.queued and before is not None and before.holds and not route.holds:
                self.service[route.key].cold_starts.inc()  # requests waited for this engine to start
            self.table = table  # before the pump: released requests read the new route
            gate.update(route)
        self.table = table
        for key in [k for k in self.gates if table.by_key(k) is None]:
            gate = self.gates.pop(key)
            gate.close()
            gate.refuse_waiters(Refused(503, 5, f"{key} is no longer served here"))
            self.outliers.pop(key).close()
            self.service.pop(key)
            self.metrics.forget(key)
            before = old.by_key(key)
            if before is not None and before.upstream:
                self.pool.drop(before.upstream)
        self.metrics.table_version.set(table.version)

    # -- connections ---------------------------------------------------------------------------

    def protocol(self, route_key: str | None) -> ClientConn:
        """A connection on a listener: `route_key` is its route, None for the client port."""
        return ClientConn(lambda conn: self.handle(conn, route_key))

    async def handle(self, conn: ClientConn, route_key: str | None) -> None:
        try:
            while not self.draining:
                self._idle_conns.add(conn)
                try:
                    request = await read_request(conn)
                except BadRequest as err:
                    conn.write(response_bytes(err.status, http.HTTPStatus(err.status).phrase,
                                              error_body(err.status, "bad_request", err.message), keep_alive=False))
                    break
                finally:
                    self._idle_conns.discard(conn)
                if request is None:
                    break
                self._begin()
                try:
                    keep = await self._serve(conn, request, route_key)
                finally:
                    self._end()
                if not keep:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            conn.close()

    def _begin(self) -> None:
        self.active += 1
        self._quiet.clear()

    def _end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._quiet.set()

    def close_idle(self) -> None:
        """Shutting down: connections between requests are closed; busy ones finish first."""
        for conn in list(self._idle_conns):
            conn.close()

    async def wait_quiet(self) -> None:
        await self._quiet.wait()

    # -- one request ---------------------------------------------------------------------------

    def _answer(self, conn: ClientConn, request: Request, status: int, body: bytes,
                retry_after: int | None = None, keep: bool = True,
                headers: Mapping[str, str] | None = None) -> bool:
        keep = keep and request.keep_alive and not self.draining
        extra = ((b"retry-after", str(retry_after).encode()),) if retry_after is not None else ()
        extra += tuple((k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items())
        conn.write(response_bytes(status, http.HTTPStatus(status).phrase, body,
                                         keep_alive=keep, extra=extra))
        return keep

    def _client_route(self, conn: ClientConn, request: Request) -> tuple[Route | None, bool]:
        """The client port: local answers for /v1/models and /health, else route by `model`."""
        path = request.path
        if request.method == b"GET" and path in (b"/v1/models", b"/models"):
            body = json.dumps(models_body(self.table, int(time.time()))).encode()
            return None, self._answer(conn, request, 200, body)
        if request.method == b"GET" and path == b"/health":
            return None, self._answer(conn, request, 200, b'{"status":"ok"}')
        try:
            model = json.loads(request.body).get("model") if request.body else None
        except (ValueError, AttributeError):
            model = None
        if not isinstance(model, str):
            return None, self._answer(conn, request, 400, error_body(
                400, "model_required", "the request body must be JSON naming a `model`"))
        route = self.table.by_model(model)
        if route is None:
            return None, self._answer(conn, request, 404, error_body(
                404, "model_not_found", f"the model {model!r} is not served on this Mac"))
        return route, True

    async def _serve(self, conn: ClientConn, request: Request, route_key: str | None) -> bool:
        arrival = asyncio.get_running_loop().time()
        if route_key is None:
            route, keep = self._client_route(conn, request)
            if route is None:
                return keep
        else:
            route = self.table.by_key(route_key)
            if route is None:
                return self._answer(conn, request, 503, error_body(503, "not_served", f"{route_key} is not served"),
                                    retry_after=5)
        svc = self.service[route.key]
        denial = await self.access.authorize(route, conn.peer, request.headers)
        if denial is not None:
            svc.outcome["refused"].inc()
            return self._answer(conn, request, denial.status, json.dumps(denial.body).encode(), denial.retry_after,
                                headers=denial.headers)
        if route.state is RouteState.SLEEPING:
            self.wake(route.key)  # then held like a request for a starting engine
        if route.state is RouteState.STOPPED:
            # Nothing will start it for this request (no load on demand yet): say so now rather
            # than hold the client for the whole queue timeout.
            svc.outcome["refused"].inc()
            return self._answer(conn, request, 503, error_body(503, "model_not_running",
                                                             f"{route.key} is not running on this Mac"), retry_after=5)
        conn.busy = True
        try:
            return await self._forward(conn, request, self.gates[route.key], svc, arrival)
        except asyncio.CancelledError:
            if not conn.gone:
                raise
            svc.outcome["client_gone"].inc()  # its engine connection is closed: the slot is free
            return False
        finally:
            conn.busy = False

    async def _forward(self, conn: ClientConn, request: Request, gate: Gate, svc: ServiceMetrics,
                       arrival: float) -> bool:
        """Wait for a slot, send, relay; hold and retry when the engine is not there (yet)."""
        deadline = arrival + gate.route.queue_timeout_s
        stale_retry = True
        replayed = False
        while True:
            try:
                waited = await gate.acquire(deadline)
            except Refused as refused:
                svc.outcome["rejected" if refused.status == 429 else "unavailable"].inc()
                code = "queue_full" if refused.status == 429 else "model_unavailable"
                return self._answer(conn, request, refused.status, error_body(
                    refused.status, code, f"{gate.route.key}: {refused.reason}"), refused.retry_after)
            svc.queue_wait.observe(waited)
            self.energy.begin(gate.route.key, time.monotonic())
            up: UpstreamConn | None = None
            try:
                upstream = gate.route.upstream
                if upstream is None:
                    # Granted a slot by a serving table, then a table holding the route (a drain
                    # before a respawn) came before this task ran: wait for the next engine too.
                    continue
                try:
                    up = await (self.pool.get(upstream) if stale_retry else self.pool.connect(upstream))
                except ConnectFailed as err:
                    svc.connect_errors.inc()
                    log.info("front door: %s: upstream %s refused; holding the request", gate.route.key, err)
                    gate.upstream_failed()
                    continue
                try:
                    return await self._exchange(conn, request, up, svc, arrival, deadline,
                                                self.outliers[gate.route.key])
                except _NotReady:
                    svc.not_ready.inc()
                    gate.upstream_failed()  # a (re)starting engine: wait as for a refused port
                    continue
                except _EngineGone as gone:
                    discard(up)
                    svc.broken.inc()
                    if replayed or asyncio.get_running_loop().time() >= deadline:
                        svc.outcome["upstream_error"].inc()
                        return self._answer(conn, request, 502, error_body(502, "upstream_error", str(gone)), keep=False)
                    replayed = True  # once: a request that kills its engine must not kill the next one too
                    log.info("front door: %s: the engine went before answering (%s); holding the request to "
                             "send it again", gate.route.key, gone)
                    gate.upstream_failed()
                    continue
                except _StaleConnection:
                    discard(up)
                    if stale_retry:
                        stale_retry = False
                        continue
                    svc.broken.inc()
                    svc.outcome["upstream_error"].inc()
                    return self._answer(conn, request, 502, error_body(
                        502, "upstream_closed", f"{gate.route.key}: the engine closed the connection"), keep=False)
            finally:
                gate.release()
                self.energy.end(gate.route.key, time.monotonic())

    async def _exchange(self, conn: ClientConn, request: Request, up: UpstreamConn, svc: ServiceMetrics,
                        arrival: float, deadline: float, outlier: Outlier) -> bool:
        loop = asyncio.get_running_loop()
        sent = False

        def first_byte() -> None:
            nonlocal sent
            sent = True
            svc.ttfb.observe(loop.time() - arrival)

        try:
            up.write(upstream_request(request, f"{up.address[0]}:{up.address[1]}".encode()))
            stall = outlier.watch(up)
            try:
                head = await read_response_head(up, request.method)
            except UpstreamBroken as err:
                if up.reused:
                    raise _StaleConnection() from None
                outlier.failed(up.address, f"it hung up before answering: {err}")
                raise _EngineGone(str(err)) from None
            except Stalled:
                discard(up)
                raise _NotReady() from None  # never answered: back to the queue until it is back
            finally:
                stall.cancel()
            if head.status == 503 and loop.time() < deadline:
                discard(up)
                raise _NotReady()
            keep = request.keep_alive and not self.draining and head.framing != "close"
            cost = request_cost(request.method, head, svc, arrival, loop.time)
            await relay_body(up, head, conn, client_head(head, keep), first_byte, cost and cost.feed)
        except UpstreamBroken as err:
            discard(up)
            outlier.failed(up.address, f"it broke a response: {err}")
            svc.broken.inc()
            svc.outcome["upstream_error"].inc()
            log.info("front door: upstream %s broke: %s", up.address, err)
            if sent:
                return False
            return self._answer(conn, request, 502, error_body(502, "upstream_error", str(err)), keep=False)
        except ConnectionError as err:
            discard(up)
            if conn.is_closing() or conn.eof:  # the client hung up while we wrote to it
                svc.outcome["client_gone"].inc()
                return False
            outlier.failed(up.address, f"it hung up: {type(err).__name__}")
            svc.broken.inc()
            svc.outcome["upstream_error"].inc()
            log.info("front door: upstream %s broke: %r", up.address, err)
            return False if sent else self._answer(conn, request, 502, error_body(
                502, "upstream_error", f"the engine hung up: {type(err).__name__}"), keep=False)
        except BaseException:
            discard(up)
            raise
        if head.upstream_keep_alive:
            self.pool.put(up)
        else:
            discard(up)
        svc.outcome["ok" if head.status < 400 else "client_error" if head.status < 500 else "upstream_error"].inc()
        if cost is not None:
            cost.finish()
        return keep


class _NotReady(Exception):
    """The engine answered 503 (llama-server while it loads its model): hold and retry."""


class _EngineGone(Exception):
    """The engine hung up before a response head (it crashed or was stopped mid-request): nothing
    reached the client, and a completion has no side effect to repeat, so the request is held
    for the restarted engine and sent once more."""


class _StaleConnection(Exception):
    """A pooled keep-alive connection the engine had already closed: retry on a fresh one."""
