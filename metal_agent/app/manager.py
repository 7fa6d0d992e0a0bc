"""Run the built agent in phases, and shut it down in reverse.

1. adopt: supervise the previous agent's llama-servers as recorded, before
   the cluster is read (they keep serving through the whole start-up);
2. serve HTTP (/healthz at once; /readyz says what is still missing);
3. start the watches and the other loops (supervised: a failure restarts the
   loop, it never ends the agent);
4. wait until the caches are synced, on their Events (and, in a fleet, until
   the gate knows which replicas this Mac holds);
5. start the work queue, queue every key once, and when that settles sweep
   what a previous agent left that nobody wants.

Shutdown: cancel the loops, then stop the controller (queue, downloads,
engines unless --stop-on-exit, Events) beside withdrawing the agent's own
metrics endpoint. By default llama-servers outlive the agent and are adopted
by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from typing import Awaitable, Callable

import aiohttp
import structlog

from metal_agent.app import loops
from metal_agent.app.build import Agent, StartupError, build, open_api, probe_host
from metal_agent.app.config import AgentConfig
from metal_agent.controller.cleanup import shutdown
from metal_agent.tasks import cancel_and_wait, supervised_loop

log = structlog.get_logger(__name__)


class AgentExit(Exception):
    """A subsystem failed for good; the agent exits non-zero so launchd restarts it."""

    def __init__(self, subsystem: str, message: str) -> None:
        super().__init__(message)
        self.subsystem = subsystem


class Manager:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def adopt(self) -> None:
        if (door := self.agent.front_door) is not None:
            door.ports.load()  # the previous agent's stable ports, before any service is published
            door.process.adopt()  # re-attach to the running front door rather than start a second
        processes = self.agent.processes
        processes.load_adoptable()
        if kept := processes.supervise_recorded():
            log.info("supervising the previous agent's llama-servers until the cluster is read", services=kept)

    async def serve_http(self, stack: contextlib.AsyncExitStack) -> None:
        web, http = self.agent.web, self.agent.cfg.http
        await web.listeners.start()
        stack.push_async_callback(web.listeners.close)
        stack.callback(web.refusals.close)
        try:
            await web.listeners.add(http.host, http.port)
        except OSError as err:
            raise StartupError(f"cannot listen on {http.host}:{http.port} ({err.strerror}); "
                               "pass another --listen address") from None
        if (door := self.agent.front_door) is not None:
            try:
                await door.socket.start()
            except OSError as err:
                raise StartupError(f"cannot serve the agent's socket {door.socket.path}: {err}") from None
            stack.push_async_callback(door.socket.close)

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Every background loop by name; each a coroutine factory with its arguments bound."""
        a, cfg = self.agent, self.agent.cfg
        found: dict[str, Callable[[], Awaitable[None]]] = {
            "watch-inferenceservices": a.isvcs.run, "watch-models": a.models.run,
            "housekeeping": functools.partial(loops.housekeeping, a.processes, a.metrics),
            "memory-watchdog": a.watchdog.run,
        }
        if a.sleep is not None:
            found["sleep-assertion"] = a.sleep.run
        if a.mac is not None:
            found["mac-readings"] = a.mac.run
        if cfg.registration.register:
            found["heartbeats"] = functools.partial(loops.heartbeats, a.registrar.heartbeat, a.heartbeats,
                                                    cfg.registration.heartbeat_interval)
        if a.sampler is not None:
            found["power"] = functools.partial(loops.power, a.sampler, cfg.power.interval_ms)
        if a.watcher is not None:
            found["address-watch"] = a.watcher.run
        if a.web.endpoint is not None:
            found["metrics-endpoint"] = a.web.endpoint.run
        if a.fleet is not None:
            found.update(a.fleet.loops())
        if a.front_door is not None:
            found["front-door"] = a.front_door.process.run
            found["front-door-table"] = a.front_door.pusher.run
            found["front-door-rebind"] = a.front_door.rebind.run
            found["on-demand"] = a.front_door.on_demand.run
            found.update(a.front_door.access.loops())
        return found

    async def until_synced(self) -> None:
        a = self.agent
        await a.isvcs.synced.wait()
        await a.models.synced.wait()
        await a.reconciler.gate.wait_ready()  # fleet: until the Leases are read and ours renewed

    async def start_controller(self) -> None:
        """Once synced: reconcile every service and every process once, then sweep."""
        a = self.agent
        await self.until_synced()
        if a.mac is not None and not a.mac.read.is_set():
            await a.mac.refresh()  # the GPU's wired-memory ceiling is known before anything is admitted
        a.runner.start()
        a.intake.resync_all(a.processes.supervisors)
        await a.queue.wait_idle()
        if a.front_door is not None:
            a.front_door.pusher.arm()  # every service reconciled once: the table is whole
        await loops.cleanup_until_done(functools.partial(a.sweep.sweep_unwanted, a.cfg.kube.namespaces or None))
        log.info("initial sync complete", services=len(a.processes.supervisors))

    async def stop(self) -> None:
        """Side by side: an API server that does not answer costs the shutdown one timeout, not two."""
        a = self.agent
        door = a.front_door if a.cfg.controller.stop_on_exit else None  # else it serves on, for the next agent
        await asyncio.gather(
            *([door.process.stop()] if door is not None else []),
            *([a.sleep.release()] if a.sleep is not None else []),
            shutdown(queue=a.queue, model_files=a.model_files, processes=a.processes, events=a.events,
                     stop_processes=a.cfg.controller.stop_on_exit),
            *([a.web.endpoint.withdraw()] if a.web.endpoint is not None else []))

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set. Raises StartupError for a busy port; any other exception is a bug."""
        self.adopt()
        async with contextlib.AsyncExitStack() as stack:
            await self.serve_http(stack)
            background = [asyncio.create_task(supervised_loop(name, factory, self.agent.metrics.loop_failures),
                                              name=name) for name, factory in self.loops().items()]
            startup = asyncio.create_task(self.start_controller(), name="start-controller")
            try:
                await stop.wait()
            finally:
                await cancel_and_wait(*(t for t in [startup, *background] if not t.done()))
                await self.stop()


def _handle_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def run_agent(cfg: AgentConfig, *, stop: asyncio.Event | None = None, handle_signals: bool = True) -> None:
    """Run until `stop` is set or SIGTERM/SIGINT arrives; raise AgentExit on fatal failure."""
    stop = stop or asyncio.Event()
    if handle_signals:
        _handle_signals(stop)
    host = await probe_host(cfg)
    for directory in (cfg.paths.state, cfg.paths.logs, cfg.paths.models):
        directory.mkdir(parents=True, exist_ok=True)
    api = await open_api(cfg)
    http = aiohttp.ClientSession()
    fatal: AgentExit | None = None
    try:
        agent = build(cfg, host, api, http)
        await asyncio.to_thread(agent.fatal_exits.load)
        try:
            await Manager(agent).run(stop)
        except StartupError:
            raise
        except Exception as exc:  # a bug outside every loop: exit non-zero so launchd restarts the agent
            log.error("metal-agent failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            fatal = AgentExit("internal", f"{type(exc).__name__}: {exc}")
    finally:
        await http.close()
        await api.close()
    if fatal is not None:
        try:  # counted in the state directory, so the next agent's /metrics shows it
            await asyncio.to_thread(agent.fatal_exits.record, fatal.subsystem)
        except OSError as err:
            log.warning("could not record the fatal exit", error=f"{type(err).__name__}: {err}")
        raise fatal
    log.info("metal-agent stopped", left_running=not cfg.controller.stop_on_exit)
