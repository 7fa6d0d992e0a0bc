"""The agent's own HTTP endpoint: Prometheus metrics and health probes.

Kept small and general on purpose: :func:`create_app` returns a plain
:class:`aiohttp.web.Application` that other parts of the agent (the control
loop) add routes to before it is served. It binds to loopback by default;
LLMKube's agent listened on every interface without authentication, and
exposing the endpoint further is a deliberate operator choice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "RunningServer", "create_app", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9090

Readiness = Callable[[], "bool | str"]  # True: ready; False or a reason: not ready


def create_app(registry: CollectorRegistry, *, ready: Readiness = lambda: True) -> web.Application:
    """Build the app: ``/metrics`` from ``registry``, ``/healthz`` and ``/readyz``.

    ``/healthz`` answers 200 whenever the event loop is serving requests (the
    process is alive); ``/readyz`` answers 200 or 503 from ``ready()``, which
    the caller supplies because only it knows what "ready" means. A reason
    returned instead of False is the 503's body, for whoever looks.
    """

    async def metrics(request: web.Request) -> web.Response:
        # Negotiate like prometheus_client's own handler: OpenMetrics when
        # the scraper asks for it, the classic text format otherwise.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        verdict = ready()
        if verdict is True:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {verdict}\n" if isinstance(verdict, str) else "not ready\n")

    app = web.Application()
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
