"""Watching a service's EndpointSlices the way a cluster client sees them (fleet tests and bench/fleet.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from kubernetes_asyncio import client

from tests.support.isvc import Cluster


async def slices(cluster: Cluster, service: str) -> list:
    listing = await client.DiscoveryV1Api(cluster.api).list_namespaced_endpoint_slice(
        cluster.ns, label_selector=f"kubernetes.io/service-name={service}")
    return listing.items


async def ready_endpoints(cluster: Cluster, service: str) -> list[tuple[str, int]]:
    """(address, port) of every endpoint of the service whose slice says ready."""
    return [(e.addresses[0], s.ports[0].port) for s in await slices(cluster, service)
            for e in s.endpoints or [] if e.conditions and e.conditions.ready]


class ReadyWatcher:
    """Samples the service's ready endpoints every `interval`: the most it ever saw, the time
    spent with more ready endpoints than `limit` and with none, and when each address was
    last seen ready (a sample's duration is the time since the previous sample)."""

    def __init__(self, cluster: Cluster, service: str, *, limit: int | None = None, interval: float = 0.05) -> None:
        self.cluster, self.service, self.limit, self.interval = cluster, service, limit, interval
        self.most = 0
        self.last_ready: dict[str, float] = {}
        self.first_ready: dict[str, float] = {}
        self.zero_since: float | None = None
        self.zero_s = 0.0
        self.over_s = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        previous = time.monotonic()
        while True:
            ready = await ready_endpoints(self.cluster, self.service)
            now = time.monotonic()
            self.most = max(self.most, len(ready))
            if self.limit is not None and len(ready) > self.limit:
                self.over_s += now - previous
            for address, _ in ready:
                self.last_ready[address] = now
                self.first_ready.setdefault(address, now)
            if not ready:
                self.zero_since = self.zero_since or now
            elif self.zero_since is not None:
                self.zero_s += now - self.zero_since
                self.zero_since = None
            previous = now
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> "ReadyWatcher":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
