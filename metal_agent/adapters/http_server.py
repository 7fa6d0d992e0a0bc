"""The agent's own HTTP endpoint: Prometheus metrics and health probes.

Kept small and general on purpose: :func:`create_app` returns a plain
:class:`aiohttp.web.Application` that other parts of the agent (the control
loop) add routes to before it is served. It binds to loopback by default;
the agent also listens on its registered address for the cluster's
Prometheus, and a request that arrives on any address but loopback must
then carry a bearer token the cluster vouches for (``authorize``; the rules
are in ``core/metrics_auth.py``). ``/healthz`` and ``/readyz`` stay open.
Before either, ``guard_middleware`` refuses what a web browser could have
sent on someone else's behalf (``core/request_guard.py``): a foreign Host
or Origin, a POST that is not JSON. Every refusal is counted by reason and
a sample of them logged (``adapters/refusal_log.py``).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from metal_agent.adapters.refusal_log import RefusalLog
from metal_agent.core.metrics_auth import Verdict, bearer_token, needs_authentication, verb_for
from metal_agent.core.request_guard import RequestFacts, check

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Listeners", "RunningServer", "create_app", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9090

Readiness = Callable[[], "bool | str"]  # True: ready; False or a reason: not ready
Authorize = Callable[[str, str, str, str], Awaitable[Verdict]]  # (token, verb, path, source address) -> verdict

# What each verdict status is counted and logged as.
_AUTH_REASONS = {401: "Unauthenticated", 403: "Forbidden", 429: "ReviewRateLimited", 503: "ReviewUnavailable"}


def _local_address(request: web.Request) -> str | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[0] if isinstance(sockname, tuple) and sockname else None


def _where(request: web.Request) -> dict:
    """What a refusal's log line says about the request (never a header that may hold a secret)."""
    return {"method": request.method[:20], "path": request.path[:200], "remote": request.remote or ""}


def guard_middleware(allowed_hosts: frozenset[str], refusals: RefusalLog):
    """Refuse, before anything else runs, what a browser could have sent for a web page (403, JSON body)."""

    @web.middleware
    async def guard(request: web.Request, handler):
        refusal = check(RequestFacts(
            method=request.method, path=request.path, host=request.headers.get("Host"),
            origin=request.headers.get("Origin"), content_type=request.headers.get("Content-Type"),
            fetch_site=request.headers.get("Sec-Fetch-Site"), local_address=_local_address(request),
        ), allowed_hosts)
        if refusal is None:
            return await handler(request)
        refusals.refused(refusal.reason, refusal.message, **_where(request))
        return web.json_response({"error": refusal.message, "reason": refusal.reason}, status=403)

    return guard


def auth_middleware(authorize: Authorize, refusals: RefusalLog | None = None):
    """Requests on a non-loopback address (other than the open probes) need the cluster's yes."""
    refusals = refusals or RefusalLog()

    @web.middleware
    async def check_token(request: web.Request, handler):
        if not needs_authentication(_local_address(request), request.path):
            return await handler(request)
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            refusals.refused("Unauthenticated", "no bearer token", **_where(request))
            return web.Response(status=401, text="unauthorized: a bearer token is required\n",
                                headers={"WWW-Authenticate": 'Bearer realm="metal-agent"'})
        found = await authorize(token, verb_for(request.method), request.path, request.remote or "")
        if found.allowed:
            return await handler(request)
        refusals.refused(_AUTH_REASONS.get(found.status, str(found.status)), found.reason,
                         **_where(request), **({"user": found.user} if found.user else {}))
        headers = {"WWW-Authenticate": 'Bearer realm="metal-agent"'} if found.status == 401 else {}
        if found.status == 429:
            headers["Retry-After"] = str(max(1, math.ceil(found.retry_after)))
        return web.Response(status=found.status, text=found.reason + "\n", headers=headers)

    return check_token


def create_app(registry: CollectorRegistry, *, ready: Readiness = lambda: True,
               authorize: Authorize | None = None, allowed_hosts: frozenset[str] | None = None,
               refusals: RefusalLog | None = None,
               extra_metrics: Callable[[], Awaitable[str]] | None = None,
               note: Callable[[], str | None] | None = None) -> web.Application:
    """Build the app: ``/metrics`` from ``registry``, ``/healthz`` and ``/readyz``.

    ``/healthz`` answers 200 whenever the event loop is serving requests (the
    process is alive); ``/readyz`` answers 200 or 503 from ``ready()``, which
    the caller supplies because only it knows what "ready" means. A reason
    returned instead of False is the 503's body, for whoever looks. With
    ``authorize``, requests that do not arrive on loopback are authenticated
    (`metal-agent power serve`, which has no cluster to ask, passes none).
    With ``allowed_hosts`` (the agent passes it, with the names its owner
    listed), requests a browser could have forged are refused first;
    `power serve`, which has metrics alone and nothing to change, passes none.
    ``extra_metrics()``: more Prometheus text appended to the classic text format (the
    front door's own registry, fetched at scrape time); OpenMetrics scrapes get the agent's alone.
    ``note()``: said after "ready" while it returns text (a throttling Mac: ready, but slower).
    """

    async def metrics(request: web.Request) -> web.Response:
        # Negotiate like prometheus_client's own handler: OpenMetrics when
        # the scraper asks for it, the classic text format otherwise.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(registry)
        if extra_metrics is not None and content_type.startswith("text/plain"):
            body += (await extra_metrics()).encode()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        verdict = ready()
        if verdict is True:
            said = note() if note is not None else None
            return web.Response(text=f"ready; {said}\n" if said else "ready\n")
        return web.Response(status=503, text=f"not ready: {verdict}\n" if isinstance(verdict, str) else "not ready\n")

    refusals = refusals or RefusalLog()
    middlewares = []
    if allowed_hosts is not None:
        middlewares.append(guard_middleware(allowed_hosts, refusals))
    if authorize is not None:
        middlewares.append(auth_middleware(authorize, refusals))
    app = web.Application(middlewares=middlewares)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@dataclass(frozen=True, slots=True)
class RunningServer:
    """Where a served app actually listens (``port`` is resolved when 0 was asked)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class Listeners:
    """One app on several addresses, added and removed while it runs (the registered address
    moves when the Mac changes networks; loopback stays)."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self._sites: dict[tuple[str, int], web.TCPSite] = {}

    async def start(self) -> None:
        await self._runner.setup()

    async def add(self, host: str, port: int) -> RunningServer:
        """Listen on host:port too (a real port: the address is registered with it)."""
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._sites[(host, port)] = site
        return RunningServer(host, port)

    async def remove(self, host: str, port: int) -> None:
        site = self._sites.pop((host, port), None)
        if site is not None:
            await site.stop()

    async def close(self) -> None:
        self._sites.clear()
        await self._runner.cleanup()


@asynccontextmanager
async def serve(app: web.Application, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> AsyncIterator[RunningServer]:
    """Serve ``app`` on ``host:port`` for the duration of the ``async with`` block.

    ``port=0`` picks a free port, reported in the yielded :class:`RunningServer`.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield RunningServer(host, runner.addresses[0][1])
    finally:
        await runner.cleanup()
