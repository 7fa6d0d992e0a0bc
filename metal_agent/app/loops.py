"""The agent's background loops, each a module-level coroutine with explicit arguments.

No loop ends the agent: `tasks.supervised_loop` logs a failure, counts it in
loop_failures_total and restarts the loop (the watches retry an absent API by
themselves, for as long as it takes, and the supervisors keep the models
healthy meanwhile). Only a stop request ends the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Awaitable, Callable

import aiohttp
import psutil
import structlog
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters.powermetrics import PowerSampler, check_sudo_grant
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.app.readiness import HeartbeatHealth
from metal_agent.metrics import AgentMetrics, service_labels
from metal_agent.tasks import LOOP_BACKOFF

log = structlog.get_logger(__name__)

HOUSEKEEPING_INTERVAL = 60.0
HEARTBEAT_RETRY = 2.0  # while the API is away: the first heartbeat after an outage says this Mac is back


def services_view(processes: ProcessManager) -> list[dict]:
    """What `metal-agent status` shows: one row per supervised service."""
    now = time.time()
    rows = []
    for key, supervisor in sorted(processes.supervisors.items()):
        snap = supervisor.snapshot
        rss = None
        if snap.pid:
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(snap.pid).memory_info().rss
        rows.append({
            "service": key, "state": snap.state.value, "pid": snap.pid, "port": snap.port,
            "uptime_s": round(now - snap.started_at, 1) if snap.started_at and snap.pid else None,
            "restarts": snap.restarts, "rss_bytes": rss, "spec_hash": snap.spec_hash[:12],
            "adopted": snap.adopted,
        })
    return rows


async def heartbeats(heartbeat: Callable[[], Awaitable[tuple[int, int]]], health: HeartbeatHealth,
                     interval: float) -> None:
    """Refresh the slices' heartbeat annotation. A round that meets the API away or a
    dropped connection is logged and the next round tries again; anything else is a bug,
    left to `supervised_loop`."""
    while True:
        # While the API is away, try every few seconds: the first heartbeat after an outage
        # is what tells LLMKube (and /readyz) that this Mac is back.
        await asyncio.sleep(interval if health.failing_since is None else min(interval, HEARTBEAT_RETRY))
        try:
            sent, failed = await heartbeat()
        except (ApiException, aiohttp.ClientError, OSError) as err:  # OSError covers timeouts
            log.warning("heartbeat round failed; next round retries", error=f"{type(err).__name__}: {err}")
            sent = failed = 1
        health.round(sent, failed)


async def housekeeping(processes: ProcessManager, metrics: AgentMetrics) -> None:
    """Once a minute: cap llama-server log sizes, refresh per-process RSS."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
        try:
            await processes.rotate_logs()
        except OSError as err:  # a full disk: the logs grow until there is room, the agent keeps going
            log.warning("log rotation failed; retrying in a minute", error=f"{type(err).__name__}: {err}")
        for row in services_view(processes):
            if row["rss_bytes"] is not None:
                metrics.process_rss.labels(**service_labels(row["service"])).set(row["rss_bytes"])


async def power(sampler: PowerSampler, interval_ms: int) -> None:
    grant = await check_sudo_grant(interval_ms)
    if not grant.ok:
        log.error("powermetrics sudo grant is not usable; power gauges stay at 0 until it is",
                  status=grant.status, detail=grant.detail, fix=grant.fix)
    await sampler.run()


async def until_ready(ready: Callable[[], bool], poll: float = 0.2) -> None:
    """Until a gate without an Event of its own says it is ready (the fleet's Leases read and
    ours renewed); a static allowlist is ready at once and is never polled."""
    while not ready():
        await asyncio.sleep(poll)


async def cleanup_until_done(sweep: Callable[[], Awaitable[None]]) -> None:
    """The start-up sweep; API trouble is retried with back-off, cleanup is never given up."""
    failures = 0
    while True:
        try:
            await sweep()
            return
        except Exception as err:  # noqa: BLE001 - API trouble: try again, never give up on cleanup
            failures += 1
            delay = LOOP_BACKOFF.delay(failures)
            log.warning("start-up cleanup failed; retrying", error=f"{type(err).__name__}: {err}",
                        retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)
