"""Settings have their defaults in one place: `metal-agent run` with no flags hands the agent
exactly the defaults of `app.config`, group by group, and the flags land in their groups."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
from typer.testing import CliRunner

from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.app.config import (AgentConfig, ControllerSettings, DownloadSettings, EngineSettings, FleetConfig,
                                    HttpSettings, KubeSettings, MemorySettings, PowerSettings, RegistrationSettings)
from metal_agent.cli.main import app


@pytest.fixture
def run_cli(monkeypatch, tmp_path):
    """`metal-agent run ARGV` in-process with the agent replaced; returns the AgentConfig it got."""
    import logging

    import structlog

    import metal_agent.app.manager as manager

    seen: list[AgentConfig] = []

    async def fake_run_agent(cfg):
        seen.append(cfg)

    monkeypatch.setattr(manager, "run_agent", fake_run_agent)
    for name in [n for n in os.environ if n.startswith("METAL_AGENT_") or n == "KUBECONFIG"]:
        monkeypatch.delenv(name)
    saved, handlers = structlog.get_config(), list(logging.root.handlers)

    def run(*argv: str) -> AgentConfig:
        result = CliRunner().invoke(app, ["run", "--llama-server", sys.executable, "--model-dir", str(tmp_path),
                                          "--log-format", "json", *argv])
        assert result.exit_code == 0, result.output
        return seen[-1]

    yield run
    structlog.configure(**saved)
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)


def test_no_flags_means_the_settings_defaults(run_cli):
    cfg = run_cli()
    assert cfg.engines == EngineSettings(llama_server=sys.executable)
    assert (cfg.kube, cfg.registration, cfg.http, cfg.memory, cfg.downloads, cfg.fleet) == (
        KubeSettings(), RegistrationSettings(), HttpSettings(), MemorySettings(), DownloadSettings(), FleetConfig())
    assert cfg.supervisor == SupervisorSettings()
    assert cfg.power == PowerSettings(enabled=sys.platform == "darwin")
    # The policy is built from the model folder; everything else in the group is the default.
    assert dataclasses.replace(cfg.controller, policy=None) == ControllerSettings()


def test_flags_land_in_their_groups(run_cli):
    cfg = run_cli("--listen", "0.0.0.0:9191", "--no-register", "--memory-fraction", "0.5", "--fleet",
                  "--lease-duration", "30", "--max-download-size", "1Gi", "--startup-timeout", "30")
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9191)
    assert cfg.registration.register is False and cfg.memory.fraction == 0.5
    assert cfg.fleet.enabled and cfg.fleet.lease_duration == 30
    assert cfg.downloads.max_size == 2**30 and cfg.supervisor.startup_timeout == 30
