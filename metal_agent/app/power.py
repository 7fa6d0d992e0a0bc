"""`metal-agent power serve`: the power metrics alone, for a Mac that needs nothing else.

No cluster, no kubeconfig, no Kubernetes client (not even imported): the
pinned `sudo powermetrics` sampler, the energy counter and `host_info` on
`/metrics`, with `/healthz` and `/readyz` (ready while samples arrive). With
no cluster to ask about tokens, nothing is authenticated: it listens on
loopback unless told otherwise, and says so when told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from metal_agent import __version__
from metal_agent.adapters.host_facts import read_host_facts, register_host_info
from metal_agent.adapters.http_server import create_app, serve
from metal_agent.adapters.powermetrics import PowerSampler
from metal_agent.adapters.sudo_grant import check_sudo_grant
from metal_agent.core.metrics_auth import is_loopback
from metal_agent.core.names import METRIC_PREFIX

log = structlog.get_logger(__name__)


async def build(interval_ms: int) -> tuple[web.Application, PowerSampler]:
    """The app and its sampler (not started): what `serve_power` runs."""
    registry = CollectorRegistry()
    sampler = PowerSampler(registry, interval_ms=interval_ms)
    register_host_info(registry, await read_host_facts(), __version__)

    def ready() -> bool | str:
        return True if registry.get_sample_value(METRIC_PREFIX + "apple_power_sampler_up") == 1 \
            else "powermetrics is not delivering samples"

    return create_app(registry, ready=ready), sampler


async def serve_power(host: str, port: int, interval_ms: int, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    app, sampler = await build(interval_ms)
    if not is_loopback(host):
        log.warning("serving power metrics without authentication on a non-loopback address "
                    "(power serve has no cluster to check tokens with)", listen=f"{host}:{port}")
    grant = await check_sudo_grant(interval_ms)
    if not grant.ok:
        log.error("powermetrics sudo grant is not usable; power gauges stay at 0 until it is",
                  status=grant.status, detail=grant.detail, fix=grant.fix)
    async with serve(app, host, port) as server:
        log.info("serving power metrics", url=f"{server.url}/metrics", interval_ms=interval_ms)
        task = asyncio.create_task(sampler.run(), name="power")
        try:
            await stop.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
