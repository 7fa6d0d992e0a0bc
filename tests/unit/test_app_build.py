"""The composition root without a cluster: `app.build` produces the whole graph (nothing runs,
nothing connects), every part is handed the real objects it calls, and `app.manager` runs the
phases in order, with /readyz saying what is missing, and shuts down cleanly."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from kubernetes_asyncio import client

from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.llama_binary import LlamaServerInfo
from metal_agent.app.build import Agent, Host, build, probe_host
from metal_agent.app.config import AgentConfig, EngineSettings, FleetConfig, HttpSettings, RegistrationSettings
from metal_agent.app.manager import Manager
from metal_agent.core.flags import Dialect
from metal_agent.core.host_info import HostFacts
from metal_agent.core.mlx_dialect import OPTION_SINCE, MlxDialect
from metal_agent.paths import AgentPaths
from tests.support.wait import wait_for

WAITING = "waiting for the first list of InferenceServices and Models"


def host(address: str = "127.0.0.1", mlx_dialect: MlxDialect = MlxDialect()) -> Host:
    return Host(llama=LlamaServerInfo("/bin/llama-server", "test", Dialect()), mlx=(), threads=2, host_ip=address,
                choice=None, bind=address, facts=HostFacts("test-mac", "Apple M5", "26.1", 64 * 2**30),
                mlx_dialect=mlx_dialect)


@contextlib.asynccontextmanager
async def built(tmp_path, address: str = "127.0.0.1", mlx_dialect: MlxDialect = MlxDialect(), **settings):
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # nothing listens: nothing here may need it
    api, http = api_client(configuration), aiohttp.ClientSession()
    cfg = AgentConfig(paths=AgentPaths(tmp_path / "models", tmp_path / "logs", tmp_path / "state"), **settings)
    try:
        yield build(cfg, host(address, mlx_dialect=mlx_dialect), api, http)
    finally:
        await http.close()
        await api.close()


async def test_every_part_is_handed_the_parts_built_before_it(tmp_path):
    from metal_agent.app.config import FrontDoorSettings

    # Without the front door, so each event source's handler is the intake's own (with it, the
    # InferenceService events also reach the access source: the front door test below).
    async with built(tmp_path, front_door=FrontDoorSettings(enabled=False)) as agent:
        assert all(getattr(agent, name) is not None for name in ("queue", "intake", "reconciler", "runner", "sweep"))
        # Event sources call the intake, which feeds the one queue the runner drains.
        assert agent.isvcs.on_change == agent.intake.on_isvc_change
        assert agent.models.on_change == agent.intake.on_model_change
        assert agent.processes.on_change == agent.intake.on_process_change
        assert agent.intake.queue is agent.queue is agent.runner.queue
        assert agent.model_files.on_ready == agent.queue.add
        # The InferenceService cache is one store, filled by the informer and read by the intake.
        assert agent.intake.isvcs is agent.isvcs.cache
        # Memory: the guard and the reconciler share the state the responder writes.
        assert agent.guard.waiting is agent.reconciler.pressure.waiting
        assert agent.guard.is_blocked == agent.watchdog.is_blocked
        assert agent.reconciler.address is agent.address
        assert agent.fleet is None and agent.watcher is None


async def test_readiness_is_checked_per_part_in_order(tmp_path):
    async with built(tmp_path) as agent:
        assert agent.readiness.parts() == ["api", "caches", "front-door"]
        assert agent.readiness() == WAITING
        agent.isvcs.synced.set()
        agent.models.synced.set()
        assert agent.readiness() == "the front door is not running (it is being started)"
        agent.front_door.process.up = True
        assert agent.readiness() is True
        agent.heartbeats.round(sent=2, failed=2)
        assert agent.readiness().startswith("API server unreachable for 0s; supervising 0 llama-server(s) locally")


async def test_the_loops_follow_the_settings(tmp_path):
    async with built(tmp_path, registration=RegistrationSettings(register=False)) as agent:
        assert set(Manager(agent).loops()) == {"watch-inferenceservices", "watch-models", "housekeeping",
                                               "memory-watchdog", "sleep-assertion", "mac-readings", "front-door",
                                               "front-door-table", "front-door-api-keys", "front-door-nodes",
                                               "front-door-rebind", "on-demand"}
    async with built(tmp_path) as agent:
        assert {"heartbeats", "metrics-endpoint"} <= set(Manager(agent).loops())


async def test_the_queue_starts_only_once_the_caches_are_synced(tmp_path):
    async with built(tmp_path, registration=RegistrationSettings(register=False)) as agent:
        manager = Manager(agent)
        start = asyncio.create_task(manager.start_controller())
        await asyncio.sleep(0)
        assert not start.done() and agent.queue._workers == []
        agent.isvcs.synced.set()
        agent.models.synced.set()
        await asyncio.wait_for(start, timeout=5)
        assert agent.queue._workers
        await agent.queue.stop()


async def test_the_manager_serves_http_then_stops_on_request(tmp_path):
    from tests.support.ports import free_port

    port = free_port()
    async with built(tmp_path, registration=RegistrationSettings(register=False),
                     http=HttpSettings(port=port)) as agent:
        stop = asyncio.Event()
        run = asyncio.create_task(Manager(agent).run(stop))
        async with aiohttp.ClientSession() as session:
            async def readyz() -> tuple[int, str] | None:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status, await resp.text()
                except aiohttp.ClientError:
                    return None

            status, text = await wait_for(readyz, timeout=10, what="the agent's HTTP server")
        assert status == 503 and ("API server unreachable" in text or WAITING in text)
        stop.set()
        await asyncio.wait_for(run, timeout=15)


def test_a_built_agent_names_its_parts():
    assert {"queue", "intake", "reconciler", "runner", "readiness", "web"} <= set(Agent.__dataclass_fields__)


async def test_with_the_front_door_engines_bind_loopback_and_its_parts_are_wired(tmp_path):
    from metal_agent.app.config import FrontDoorSettings

    async with built(tmp_path, "10.0.0.5", front_door=FrontDoorSettings(enabled=False)) as agent:
        # --no-front-door: nothing of it is built, engines listen on the Mac's address
        assert agent.front_door is None and agent.runner.after is None
        assert agent.reconciler.publisher.ports is None and agent.address.bind == "10.0.0.5"
    async with built(tmp_path, "10.0.0.5") as agent:  # on by default
        door = agent.front_door
        assert agent.address.bind == "127.0.0.1" and agent.address.registered == "10.0.0.5"
        assert agent.reconciler.publisher.ports is door.ports
        assert agent.runner.after == door.pusher.changed
        assert door.process.on_start == door.pusher.resend
        assert agent.readiness.parts() == ["api", "caches", "front-door"]
        assert {"front-door", "front-door-table", "front-door-api-keys", "front-door-nodes"} <= set(Manager(agent).loops())
        assert door.process.argv[1:4] == ("-m", "metal_agent", "front-door")
        assert door.process.argv[-4:] == ("--socket", str(tmp_path / "state" / "front-door.sock"),
                                          "--state-dir", str(tmp_path / "state"))
        assert door.pusher.compute()["listen_host"] == "10.0.0.5"  # the service ports: on the Mac's address
        assert agent.reconciler.rebind is door.rebind
    # --bind-all: what listened everywhere (the engines) is behind the front door, which does instead.
    async with built(tmp_path, "10.0.0.5", registration=RegistrationSettings(bind_all=True)) as agent:
        assert agent.address.bind == "127.0.0.1" and agent.front_door.pusher.compute()["listen_host"] == "0.0.0.0"


async def test_the_installed_mlx_lm_found_at_start_up_reaches_every_command_line(tmp_path, llama_server_bin):
    """probe_host reads this venv's mlx_lm.server --help (beside llama-server's); build hands it to the
    reconciler's launch settings, which cut MLX command lines to it and refuse specs it is too old for."""
    cfg = AgentConfig(paths=AgentPaths(tmp_path / "models", tmp_path / "logs", tmp_path / "state"),
                      engines=EngineSettings(llama_server=str(llama_server_bin), threads=2),
                      registration=RegistrationSettings(host_ip="127.0.0.1"))
    found = await probe_host(cfg)
    assert found.mlx and found.mlx_dialect.version != "unknown"
    assert set(OPTION_SINCE) <= found.mlx_dialect.options  # the test extra's floor, mlx-lm 0.32.0
    old = MlxDialect("0.30.5", frozenset({"--model", "--host", "--port"}))
    async with built(tmp_path, mlx_dialect=old) as agent:
        assert agent.reconciler.launch.mlx_dialect is old
        assert agent.sweep.launch is agent.reconciler.launch  # the sweep judges as the reconcile
    async with built(tmp_path, mlx_dialect=old, fleet=FleetConfig(enabled=True)) as agent:
        assert agent.fleet.demand.s.launch is agent.reconciler.launch  # nor does the Mac bid for what it refuses
        # ... nor for a model outside the model store, which its reconciler refuses (SourceNotAllowed).
        assert agent.fleet.demand.s.policy == agent.reconciler.launch.policy
        assert agent.fleet.demand.s.policy.model_roots == (str(tmp_path / "models"),)


async def test_a_missing_llama_server_ends_start_up_with_its_own_error(tmp_path):
    from metal_agent.adapters.llama_binary import LlamaServerMissing

    cfg = AgentConfig(paths=AgentPaths(tmp_path / "models", tmp_path / "logs", tmp_path / "state"),
                      engines=EngineSettings(llama_server=str(tmp_path / "no-llama-server"), threads=2),
                      registration=RegistrationSettings(host_ip="127.0.0.1"))
    with pytest.raises(LlamaServerMissing):  # not wrapped: cli.run reports it by its type
        await probe_host(cfg)
