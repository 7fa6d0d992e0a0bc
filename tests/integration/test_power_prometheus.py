"""A real Prometheus scrapes the agent's /metrics while the sampler replays the M5 capture."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from metal_agent.adapters.http_server import create_app, serve
from metal_agent.adapters.powermetrics import PowerSampler
from tests.support.fake_powermetrics import M5_CAPTURE, M5_COMBINED_W
from tests.support.fake_powermetrics import command as stand_in
from tests.support.prometheus import Prometheus, require_prometheus
from tests.support.wait import wait_for

COMBINED = "llmkube_metal_agent_apple_power_combined_watts"
UP = "llmkube_metal_agent_apple_power_sampler_up"


@pytest.fixture
async def prometheus_for(tmp_path: Path) -> AsyncIterator:
    binary = require_prometheus()
    started: list[Prometheus] = []

    async def start(target: str) -> Prometheus:
        prom = Prometheus(binary, tmp_path, [target])
        started.append(prom)
        await prom.start()
        return prom

    try:
        yield start
    finally:
        for prom in started:
            await prom.stop()


async def test_prometheus_reads_replayed_power_from_the_agent(shared_dir: Path, prometheus_for) -> None:
    registry = CollectorRegistry()
    sampler = PowerSampler(
        registry,
        interval_ms=200,
        executable_override_for_tests=stand_in(shared_dir / M5_CAPTURE, "--after", "loop"),
    )
    app = create_app(registry, ready=lambda: registry.get_sample_value(UP) == 1)
    task = asyncio.create_task(sampler.run())
    try:
        async with serve(app, "127.0.0.1", 0) as server:
            prom = await prometheus_for(f"127.0.0.1:{server.port}")

            async def replayed_value() -> list | None:
                result = await prom.query(COMBINED)
                if result and any(math.isclose(float(result[0]["value"][1]), w) for w in M5_COMBINED_W):
                    return result
                return None

            (series,) = await wait_for(replayed_value, timeout=60, what=f"{COMBINED} with a replayed value", interval=0.25)
            scraped_at = series["value"][0]
            (up,) = await prom.query(UP, at=scraped_at)
            (target_up,) = await prom.query('up{job="metal-agent"}', at=scraped_at)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    assert series["metric"] == {"__name__": COMBINED, "instance": f"127.0.0.1:{server.port}", "job": "metal-agent"}
    assert up["value"][1] == "1"
    assert target_up["value"][1] == "1"


async def test_http_endpoints() -> None:
    registry = CollectorRegistry()
    PowerSampler(registry)  # registers its gauges on the registry; not run here
    ready = False
    app = create_app(registry, ready=lambda: ready)

    async with serve(app, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
        async with http.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{server.url}/readyz") as resp:
            assert resp.status == 503
        ready = True
        async with http.get(f"{server.url}/readyz") as resp:
            assert resp.status == 200

        async with http.get(f"{server.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        async with http.get(
            f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).rstrip().endswith("# EOF")
        async with http.get(f"{server.url}/nope") as resp:
            assert resp.status == 404

    for suffix in ("combined", "gpu", "cpu", "ane"):
        assert f"\nllmkube_metal_agent_apple_power_{suffix}_watts 0.0\n" in text
    assert f"\n{UP} 0.0\n" in text
