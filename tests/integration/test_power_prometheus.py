"""A real Prometheus scrapes the agent's /metrics while the sampler replays the M5 capture."""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from metal_agent.adapters.http_server import create_app, serve
from metal_agent.adapters.powermetrics import PowerSampler
from metal_agent.core.energy import sample_energy
from metal_agent.core.powermetrics import parse_text
from metal_agent.core.sudoers import POWERMETRICS_PATH
from tests.support.fake_powermetrics import M5_CAPTURE, M5_COMBINED_W, exclusive_stand_in_slot, stand_in_script
from tests.support.fake_powermetrics import command as stand_in
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
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
            (busy,) = await prom.query("llmkube_metal_agent_apple_gpu_active_ratio", at=scraped_at)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    assert series["metric"] == {"__name__": COMBINED, "instance": f"127.0.0.1:{server.port}", "job": "metal-agent"}
    assert up["value"][1] == "1"
    assert target_up["value"][1] == "1"
    # GPU busy sits beside the watts, from the same replayed samples.
    replayed = parse_text((shared_dir / M5_CAPTURE).read_text())
    assert round(float(busy["value"][1]), 6) in {round(x.gpu_active_ratio, 6) for x in replayed}


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
    for name in ("active_ratio", "active_frequency_hertz"):
        assert f"\nllmkube_metal_agent_apple_gpu_{name} 0.0\n" in text
    assert f"\n{UP} 0.0\n" in text


PRIVILEGED = hasattr(os, "geteuid") and os.geteuid() == 0 and (
    bool(os.environ.get("CI")) or os.environ.get("METAL_AGENT_PRIVILEGED_TESTS") == "1"
)


@pytest.mark.skipif(not PRIVILEGED, reason="installs a stand-in /usr/bin/powermetrics and runs the real sudo: "
                                           "root with CI or METAL_AGENT_PRIVILEGED_TESTS=1")
async def test_power_serve_alone_gives_prometheus_the_capture_and_its_energy(shared_dir: Path, tmp_path: Path,
                                                                              prometheus_for) -> None:
    """`metal-agent power serve`, as a user runs it on a Mac with no cluster: the pinned
    `sudo -n /usr/bin/powermetrics ...` (real sudo; powermetrics a stand-in replaying the M5
    capture in a loop), scraped by Prometheus: gauges (GPU busy and frequency too), energy to 1 %,
    host_info, exit 0 on SIGTERM."""
    replayed = parse_text((shared_dir / M5_CAPTURE).read_text())
    per_sample = [sample_energy(x, 0.5).joules["combined"] for x in replayed]
    gpu_active = {round(x.gpu_active_ratio, 6) for x in replayed}  # the GPU gauges of the standalone service too

    def expected(n: int) -> float:
        loops, rest = divmod(n, len(per_sample))
        return loops * sum(per_sample) + sum(per_sample[:rest])

    with exclusive_stand_in_slot():
        if Path(POWERMETRICS_PATH).exists():
            pytest.skip(f"{POWERMETRICS_PATH} exists; only a stand-in where there is none")
        options = tmp_path / "options"
        options.write_text("--after loop")
        tmp_path.chmod(0o755)
        Path(POWERMETRICS_PATH).write_text(stand_in_script(shared_dir / M5_CAPTURE, options))
        Path(POWERMETRICS_PATH).chmod(0o755)
        port = free_port()
        served = ManagedProcess("power-serve", [sys.executable, "-m", "metal_agent", "power", "serve", "--listen",
                                                f"127.0.0.1:{port}", "--interval-ms", "500", "--log-format", "json"],
                                tmp_path / "power-serve.log")
        try:
            await served.start()
            prom = await prometheus_for(f"127.0.0.1:{port}")

            async def seven_samples() -> dict | None:
                result = await prom.query("llmkube_metal_agent_apple_power_samples_total")
                return result[0] if result and float(result[0]["value"][1]) >= 7 else None

            samples = await wait_for(seven_samples, timeout=60, what="7 samples scraped", interval=0.25,
                                     on_timeout=served.tail)
            at, n = samples["value"][0], int(float(samples["value"][1]))
            (energy,) = await prom.query('llmkube_metal_agent_apple_power_energy_joules_total{component="combined"}', at=at)
            (info,) = await prom.query("llmkube_metal_agent_host_info", at=at)
            (up,) = await prom.query("llmkube_metal_agent_apple_power_sampler_up", at=at)
            (busy,) = await prom.query("llmkube_metal_agent_apple_gpu_active_ratio", at=at)
            (hertz,) = await prom.query("llmkube_metal_agent_apple_gpu_active_frequency_hertz", at=at)
            assert float(energy["value"][1]) == pytest.approx(expected(n), rel=0.01)
            assert round(float(busy["value"][1]), 6) in gpu_active and float(hertz["value"][1]) == 338e6
            assert info["metric"]["hostname"] and info["value"][1] == "1" and up["value"][1] == "1"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    assert resp.status == 200
            served.signal(15)
            assert await served.wait(timeout=20) == 0, served.tail()
        finally:
            await served.stop()
            Path(POWERMETRICS_PATH).unlink(missing_ok=True)
