"""A real Prometheus server for tests: temp config and storage, loopback port.

Used to prove that what the agent serves on /metrics is what a scraper (and
so InferCost) actually reads, names and values included, rather than
trusting our own rendering of the exposition format.

Two binaries: Debian's package (static targets), and upstream Prometheus
built by scripts/build-prometheus.sh for the tests that need Kubernetes
service discovery, which Debian's build has patched out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import aiohttp
import pytest

from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for

PROMETHEUS_BIN = Path("/usr/bin/prometheus")  # Debian package `prometheus`


def require_prometheus() -> Path:
    """The binary, or a skip; in CI (``CI`` set) its absence is a failure, never a skip."""
    if PROMETHEUS_BIN.is_file() and os.access(PROMETHEUS_BIN, os.X_OK):
        return PROMETHEUS_BIN
    message = f"{PROMETHEUS_BIN} is not installed (apt-get install prometheus)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class Prometheus:
    """One Prometheus scraping ``targets`` every ``scrape_interval``; start, query, stop."""

    def __init__(self, binary: Path, workdir: Path, targets: Sequence[str] = (), *, scrape_interval: str = "1s",
                 config: dict[str, Any] | None = None) -> None:
        """Scrape static `targets` as job "metal-agent", or run a whole `config` (prometheus.yml as a dict)."""
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = workdir / "prometheus.yml"
        if config is None:
            config = {
                "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
                "scrape_configs": [{"job_name": "metal-agent", "static_configs": [{"targets": list(targets)}]}],
            }
        # JSON is valid YAML; no templating of YAML by hand.
        config_file.write_text(json.dumps(config))
        self.process = ManagedProcess(
            "prometheus",
            [
                str(binary),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            workdir / "prometheus.log",
            cwd=workdir,
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self, timeout: float = 60) -> None:
        await self.process.start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

        async def ready() -> bool:
            if not self.process.running:
                raise RuntimeError(f"prometheus exited\n{self.process.tail()}")
            try:
                async with self._session.get(f"{self.url}/-/ready") as resp:  # type: ignore[union-attr]
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, timeout=timeout, what="prometheus /-/ready", interval=0.2, on_timeout=self.process.tail)

    async def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; the ``result`` vector."""
        assert self._session is not None, "start() first"
        params = {"query": promql} | ({"time": str(at)} if at is not None else {})
        async with self._session.get(f"{self.url}/api/v1/query", params=params) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    async def active_targets(self) -> list[dict[str, Any]]:
        """`/api/v1/targets`' active targets: discovered, kept by relabelling, scraped."""
        assert self._session is not None, "start() first"
        async with self._session.get(f"{self.url}/api/v1/targets", params={"state": "active"}) as resp:
            body = await resp.json()
        return body["data"]["activeTargets"]

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.process.stop()
