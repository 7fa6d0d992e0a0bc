"""Construct the agent's parts in dependency order: every part is handed real, finished objects.

The order breaks what used to be a cycle closed by late binding:

1. what the host is (binaries, address, facts) and the API client;
2. the shared containers: the work queue, the InferenceService/Model caches,
   the table of running services, the memory state, this Mac's address;
3. the intake, which every event source calls (informers, supervisors,
   downloads, the fleet, the watchdog's responder) and which only queues keys;
4. the event sources themselves, then the memory guard;
5. the fleet (optional), the publisher, the status reporter, the reconciler
   and the runner that applies its results to the queue;
6. the HTTP app, the agent's own metrics endpoint and the address watcher.

Nothing is patched after construction and no part is a placeholder. Running
the graph (phases, readiness, shutdown) is `app.manager`'s.
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass

import aiohttp
import structlog
from kubernetes_asyncio import client, config
from prometheus_client import CollectorRegistry

from metal_agent import __version__
from metal_agent.adapters import host_cpu, llama_binary
from metal_agent.adapters.host_address import AddressWatcher, detect_host_ip
from metal_agent.adapters.host_facts import read_host_facts, register_host_info
from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import CustomResource, Informer
from metal_agent.adapters.kube.registrar import Registrar
from metal_agent.adapters.kube.secrets import SecretTokenReader
from metal_agent.adapters.kube.status_writer import StatusWriter
from metal_agent.adapters.memory_watchdog import MemoryWatchdog, system_memory
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.adapters.mac_readings import MacReadings, ReadingCommands
from metal_agent.adapters.powermetrics import PowerSampler
from metal_agent.adapters.sleep_assertion import SleepAssertion
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.adapters.process.records import RecordStore
from metal_agent.app.config import AgentConfig
from metal_agent.controller.access import AccessSource
from metal_agent.core.access import AccessSettings
from metal_agent.app.front_door import PowerFeed, bind_for as front_door_bind, build_front_door, supervision_for
from metal_agent.app.http import HttpParts, build_http
from metal_agent.app.readiness import ApiReachable, HeartbeatHealth, Readiness, synced_check
from metal_agent.controller.cleanup import Sweep
from metal_agent.controller.intake import Intake
from metal_agent.core.process import Snapshot, SupervisorEvent
from metal_agent.controller.publishing import AddressMove, HostAddress, Publisher
from metal_agent.controller.gate import StaticGate
from metal_agent.controller.reconciler import Managed, Reconciler
from metal_agent.controller.rollout import Rollouts
from metal_agent.controller.runner import Runner
from metal_agent.controller.status_reporter import StatusReporter
from metal_agent.controller.workqueue import WorkQueue
from metal_agent.core.claim import Allowlist
from metal_agent.core.download_limits import DownloadLimits
from metal_agent.core.egress import policy as egress_policy
from metal_agent.core.mlx_dialect import OPTION_SINCE, MlxDialect
from metal_agent.core.engine_name import EngineName
from metal_agent.core.model_urls import HF_ENDPOINT
from metal_agent.core.host_address import Choice, bind_address
from metal_agent.core.host_info import HostFacts
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.sleep_assertion import SleepMode
from metal_agent.core.names import GROUP, ISVC_PLURAL, MODEL_PLURAL, VERSION
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.core.status_owner import StatusMode
from metal_agent.memory.guard import MemoryGuard
from metal_agent.memory.responder import PressureResponder
from metal_agent.memory.state import MemoryState
from metal_agent.metrics import AgentMetrics, FatalExitLog, service_labels

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """A configuration the agent cannot start with (bad kubeconfig, busy port): say so, exit 2."""


@dataclass(frozen=True)
class Host:
    """What this Mac is, found before anything is built."""

    llama: llama_binary.LlamaServerInfo
    mlx: tuple[str, ...]  # how to start mlx_lm.server; (): none found
    threads: int
    host_ip: str
    choice: Choice | None  # a detected address (followed); None: given with --host-ip
    bind: str
    facts: HostFacts
    mlx_dialect: MlxDialect = MlxDialect()  # what that mlx_lm.server accepts (default: help unread)


async def _find_mlx_server(explicit: str | None) -> tuple[tuple[str, ...], MlxDialect]:
    """How to start mlx_lm.server, or () without one: MLX Models then wait (RuntimeMissing), others run;
    and the options it accepts, so that an older mlx-lm gets a command line it can parse."""
    from metal_agent.adapters import mlx_binary

    path = mlx_binary.find_mlx_server(explicit)
    found = await mlx_binary.probe(path) if path else "not found in the agent's venv, Homebrew or PATH"
    if isinstance(found, str):
        (log.warning if explicit else log.info)("mlx_lm.server unavailable; MLX models will not start", why=found)
        return (), MlxDialect()
    dialect = await mlx_binary.probe_dialect(found)
    lacks = sorted(o for o in OPTION_SINCE if not dialect.has(o))
    log.info("mlx_lm.server found", command=list(found.command), mlx_lm_version=found.version,
             help_read=dialect.options is not None, lacks=lacks)
    return found.command, dialect


async def probe_host(cfg: AgentConfig) -> Host:
    # Both run their server's --help; mlx_lm.server's imports MLX (seconds): side by side.
    mlx_found = asyncio.create_task(_find_mlx_server(cfg.engines.mlx_server))
    try:
        info = await llama_binary.probe(cfg.engines.llama_server)
    except BaseException:
        # A missing llama-server ends start-up (its own error, unwrapped): stop the MLX probe and its child.
        mlx_found.cancel()
        await asyncio.gather(mlx_found, return_exceptions=True)
        raise
    mlx, mlx_dialect = await mlx_found
    threads = cfg.engines.threads or await host_cpu.performance_core_count()
    choice: Choice | None = None
    if cfg.registration.host_ip:
        host_ip, why = cfg.registration.host_ip, "given by --host-ip"
    else:
        choice = await asyncio.to_thread(detect_host_ip)  # may ask `tailscale ip -4`
        host_ip, why = choice.address, choice.reason
    bind = bind_address(host_ip, cfg.registration.bind_all)
    log.info("starting metal-agent", version=__version__, llama_server=info.path, llama_version=info.version,
             threads=threads, namespaces=list(cfg.kube.namespaces) or "all", host_ip=host_ip, host_ip_reason=why,
             bind=bind, register=cfg.registration.register, status_mode=cfg.controller.status_mode)
    return Host(info, mlx, threads, host_ip, choice, bind, await read_host_facts(), mlx_dialect)


async def open_api(cfg: AgentConfig) -> client.ApiClient:
    """The one API client of the agent: every call has a default timeout (adapters.kube.client)."""
    configuration = client.Configuration()
    try:
        await config.load_kube_config(config_file=cfg.kube.kubeconfig, context=cfg.kube.context,
                                      client_configuration=configuration)
    except Exception as err:  # noqa: BLE001 - YAML, missing files, exec plugins...: all mean "fix the kubeconfig"
        where = cfg.kube.kubeconfig or "~/.kube/config (or $KUBECONFIG)"
        raise StartupError(f"cannot load kubeconfig {where}: {err}") from None
    return api_client(configuration)


class WatchHealth:
    """The watches' failure counters: one gauge for both (the worse of the two is what matters)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self._failures: dict[str, int] = {}

    def failed(self, resource: str, failures: int) -> None:
        self._failures[resource] = failures
        self.metrics.watch_consecutive_failures.set(max(self._failures.values()))
        if failures:
            self.metrics.watch_failures.labels(resource).inc()

    def relisted(self, resource: str, why: str) -> None:
        self.metrics.watch_relists.labels(resource, why).inc()


def _observe_probe(metrics: AgentMetrics, key: str, seconds: float) -> None:
    metrics.health_check_duration.labels(**service_labels(key)).observe(seconds)


def _process_ready(processes: ProcessManager, key: str) -> bool:
    return bool((s := processes.get(key)) and s.snapshot.ready)


@dataclass
class Agent:
    """The built graph: what `app.manager` runs, and what tests may inspect."""

    cfg: AgentConfig
    host: Host
    api: client.ApiClient
    http: aiohttp.ClientSession
    registry: CollectorRegistry
    metrics: AgentMetrics
    fatal_exits: FatalExitLog
    queue: WorkQueue
    intake: Intake
    isvcs: Informer
    models: Informer
    processes: ProcessManager
    model_files: ModelFiles
    events: EventRecorder
    watchdog: MemoryWatchdog
    guard: MemoryGuard
    fleet: object | None  # fleet.wiring.FleetParts
    registrar: Registrar
    address: HostAddress
    reconciler: Reconciler
    runner: Runner
    sweep: Sweep
    readiness: Readiness
    heartbeats: HeartbeatHealth
    web: HttpParts
    watcher: AddressWatcher | None
    sampler: PowerSampler | None
    front_door: object | None = None  # app.front_door.FrontDoorParts with --front-door
    sleep: SleepAssertion | None = None  # the no-idle-sleep assertion (issue 23)
    mac: MacReadings | None = None  # the GPU's wired-memory ceiling and the thermal state (issue 23)


@dataclass
class _Sources:
    """The shared containers and every source of events, built around the intake."""

    registry: CollectorRegistry
    metrics: AgentMetrics
    queue: WorkQueue
    events: EventRecorder
    intake: Intake
    isvcs: Informer
    models: Informer
    processes: ProcessManager
    model_files: ModelFiles
    access: AccessSource | None = None  # --front-door: who may call it (controller/access.py)
    table_dirty: asyncio.Event | None = None  # set when anything the front door's table is made of changes


def _fan_out(*handlers):
    """One informer handler calling several parts, in order (all built before the informer)."""
    def handle(old, new) -> None:
        for handler in handlers:
            handler(old, new)
    return handle


def _process_change(intake: Intake, table_dirty: asyncio.Event | None):
    """A process's state goes to the reconciler and, with the front door, straight to the table
    pusher too: the route reads the supervisor's snapshot, so an engine that became ready is
    routable without waiting for the reconcile's API writes (status, Events, slices)."""
    if table_dirty is None:
        return intake.on_process_change

    def changed(key: str, snap: Snapshot, event: SupervisorEvent | None) -> None:
        intake.on_process_change(key, snap, event)
        table_dirty.set()
    return changed


def _access(cfg: AgentConfig, api: client.ApiClient, metrics: AgentMetrics, isvc_cache: dict,
            table_dirty: asyncio.Event, queue: WorkQueue) -> AccessSource:
    fd, http = cfg.front_door, cfg.http
    settings = AccessSettings(mode=fd.access, allow_networks=fd.allow_networks,
                              token_review_rate=http.token_review_rate,
                              token_review_global_rate=http.token_review_global_rate)
    return AccessSource(api, settings, isvc_cache, on_change=table_dirty.set, reviews_counter=metrics.token_reviews,
                        on_service=queue.add)


def _sources(cfg: AgentConfig, api: client.ApiClient, http: aiohttp.ClientSession) -> _Sources:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    queue = WorkQueue(concurrency=cfg.controller.concurrency, metrics=metrics.workqueue)
    events = EventRecorder(api, dropped=metrics.events_dropped)
    # HF_ENDPOINT: huggingface_hub's own variable, for a mirror of the hub (hf:// sources).
    hf_endpoint = os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
    downloads = cfg.downloads
    model_files = ModelFiles(cfg.paths.models, registry=registry, token_provider=SecretTokenReader(api),
                             hf_endpoint=hf_endpoint, on_ready=queue.add, on_progress=queue.add,
                             egress=egress_policy(downloads.allow_networks, downloads.token_hosts, hf_endpoint),
                             limits=DownloadLimits(downloads.max_size, downloads.free_margin),
                             default_engine=EngineName(cfg.engines.default_runtime))
    isvc_cache: dict[str, dict] = {}
    intake = Intake(queue, isvcs=isvc_cache, model_files=model_files, events=events, metrics=metrics)
    watch = WatchHealth(metrics)
    scope = cfg.kube.namespaces or None

    def informer(plural: str, on_change, cache: dict | None = None) -> Informer:
        return Informer(api, CustomResource(GROUP, VERSION, plural), on_change, namespaces=scope,
                        resync_period=cfg.kube.resync_period, on_failure=functools.partial(watch.failed, plural),
                        on_relist=functools.partial(watch.relisted, plural), cache=cache)

    table_dirty = asyncio.Event() if cfg.front_door.enabled else None
    access = _access(cfg, api, metrics, isvc_cache, table_dirty, queue) if table_dirty is not None else None
    on_isvc = _fan_out(intake.on_isvc_change, access.on_isvc_change) if access else intake.on_isvc_change
    isvcs = informer(ISVC_PLURAL, on_isvc, isvc_cache)
    models = informer(MODEL_PLURAL, intake.on_model_change)
    processes = ProcessManager(
        records=RecordStore(cfg.paths.state / "processes"), log_dir=cfg.paths.logs, http=http,
        on_change=_process_change(intake, table_dirty), settings=supervision_for(cfg),
        on_probe=functools.partial(_observe_probe, metrics),
    )
    # Read when scraped: always the number supervised now, whoever started or stopped one.
    metrics.managed_processes.set_function(lambda: len(processes.supervisors))
    return _Sources(registry, metrics, queue, events, intake, isvcs, models, processes, model_files, access,
                    table_dirty)


def _memory(cfg: AgentConfig, src: _Sources, managed: dict[str, Managed],
            mac: MacReadings, state: MemoryState) -> tuple[MemoryWatchdog, MemoryGuard, MemoryState]:
    """Given the state (shared with the Mac's readings, which re-queue who waits when the GPU's
    ceiling changes): the responder the watchdog calls, the watchdog, and the guard that asks
    the watchdog whether a service is blocked: no part needs one built after it."""
    responder = PressureResponder(state=state, running=managed, isvcs=src.isvcs.cache, processes=src.processes,
                                  events=src.events, enqueue=src.queue.add)
    mem = cfg.memory
    watchdog = MemoryWatchdog(
        src.registry, services=responder.memory_view, evict=responder.evict, unblock=responder.unblock,
        on_level_change=responder.on_pressure_change, on_eviction_skipped=responder.eviction_skipped,
        reader=mem.reader or system_memory, interval=mem.interval, memory_fraction=mem.fraction,
        eviction_enabled=mem.eviction, min_own_share=mem.min_own_share,
    )
    guard = MemoryGuard(src.model_files, src.registry, mode=mem.check_mode, agent_fraction=mem.fraction,
                        is_blocked=watchdog.is_blocked, state=state, wired=mac.current_ceiling)
    return watchdog, guard, state


def _fleet(cfg: AgentConfig, api: client.ApiClient, host: Host, src: _Sources, guard: MemoryGuard,
           address: HostAddress, launch: LaunchSettings):
    from metal_agent.fleet.wiring import build_fleet

    facts = host.facts
    return build_fleet(
        cfg, api, host=facts.host, chip=facts.chip, total_ram=facts.memory_bytes,
        version=__version__, isvcs=src.isvcs, models=src.models, memory=guard, model_files=src.model_files,
        events=src.events,
        on_key=src.queue.add, process_ready=functools.partial(_process_ready, src.processes),
        waiting=guard.waiting_reason, address=address.current, state_dir=cfg.paths.state,
        registrar_kwargs={"host": facts.host}, registry=src.registry, launch=launch,
    )


def _launch(cfg: AgentConfig, host: Host) -> LaunchSettings:
    engines = cfg.engines
    return LaunchSettings(
        llama_server=host.llama.path, mlx_server=host.mlx, host=host.bind,
        register_address=host.host_ip if cfg.registration.register else None, threads=host.threads,
        mlock=engines.mlock, dialect=host.llama.dialect, default_engine=EngineName(engines.default_runtime),
        policy=cfg.controller.policy or SpecPolicy(model_roots=(str(cfg.paths.models),)),
        mlx_dialect=host.mlx_dialect)


def _moved_event(src: _Sources, key: str, message: str) -> None:
    raw = src.isvcs.cache.get(key)
    if raw is not None:
        src.events.emit(raw["metadata"], "MovingBehindFrontDoor", message)


def build(cfg: AgentConfig, host: Host, api: client.ApiClient, http: aiohttp.ClientSession) -> Agent:
    """Every part of the agent, each built after what it is handed; nothing runs yet."""
    src = _sources(cfg, api, http)
    register_host_info(src.registry, host.facts, __version__)
    fatal_exits = FatalExitLog(cfg.paths.state / "fatal_exits.json", src.metrics.fatal_exits)
    managed: dict[str, Managed] = {}
    m, memory_state = cfg.mac, MemoryState()
    # A changed ceiling (the owner ran `sudo sysctl`) may let waiting services fit: queue them again.
    mac = MacReadings(src.registry, ReadingCommands(m.sysctl, (m.pmset, "-g", "therm"), m.readings_interval),
                      on_ceiling_change=lambda: [src.queue.add(key) for key in sorted(memory_state.waiting)])
    # "Serving or loading": every service with a supervisor, whatever its state.
    sleep = SleepAssertion(src.registry, mode=SleepMode(m.prevent_sleep), state_dir=cfg.paths.state,
                           active=lambda: len(src.processes.supervisors), caffeinate=m.caffeinate,
                           interval=m.sleep_check_interval)
    watchdog, guard, state = _memory(cfg, src, managed, mac, memory_state)
    front = cfg.front_door.enabled
    bind_for = front_door_bind(front, cfg.registration.bind_all)
    address = HostAddress(bind=bind_for(host.host_ip) if front else host.bind,
                          registered=host.host_ip if cfg.registration.register else None)
    door = build_front_door(cfg, address=address, isvcs=src.isvcs.cache, managed=managed,
                            supervisors=lambda: src.processes.supervisors, access=src.access,
                            dirty=src.table_dirty, events=src.events, enqueue=src.queue.add,
                            on_move=functools.partial(_moved_event, src)) if src.access is not None else None
    launch = _launch(cfg, host)
    fleet = _fleet(cfg, api, host, src, guard, address, launch) if cfg.fleet.enabled else None
    registrar = fleet.registrar if fleet else Registrar(api, agent_version=__version__, host=host.facts.host)
    gate = fleet.gate if fleet else StaticGate(Allowlist(cfg.controller.allowlist))
    publisher = Publisher(registrar, address, src.events, ports=door.ports if door else None,
                          drain=door.drain if door else None, routed=door.routed if door else None)
    reporter = StatusReporter(models=src.models, status=StatusWriter(api), events=src.events, metrics=src.metrics,
                              gate=gate, status_mode=StatusMode(cfg.controller.status_mode),
                              **({"api_key": src.access.condition} if src.access is not None else {}))
    reconciler = Reconciler(
        isvcs=src.isvcs, models=src.models, processes=src.processes, model_files=src.model_files, memory=guard,
        reporter=reporter, publisher=publisher, events=src.events, metrics=src.metrics, launch=launch,
        wake=src.intake.wake, managed=managed, pressure=state, gate=gate, rebind=door.rebind if door else None,
        on_demand=door.on_demand if door else None,
        rollouts=Rollouts(model_files=src.model_files, events=src.events, enqueue_after=src.queue.add_after,
                          activity=door.client.state if door else None))
    sweep = Sweep(isvcs=src.isvcs, models=src.models, processes=src.processes, publisher=publisher, managed=managed,
                  default_engine=launch.default_engine, policy=launch.policy, gate=gate, launch=launch)
    heartbeats = HeartbeatHealth()
    readiness = Readiness()
    readiness.add("api", ApiReachable((src.isvcs, src.models), heartbeats, lambda: len(src.processes.supervisors)))
    readiness.add("caches", synced_check(lambda: reconciler.synced))
    readiness.add_note(mac.note)
    if door is not None:
        readiness.add("front-door", door.process.readiness)
    web = build_http(cfg, api, registry=src.registry, metrics=src.metrics, readiness=readiness,
                     processes=src.processes, facts=host.facts, address=host.host_ip, fleet=fleet, front_door=door,
                     mac_view=lambda: {"sleep_assertion": sleep.view(), **mac.view()})
    move = AddressMove(address=address, bind_for=bind_for,
                       running=managed, isvcs=src.isvcs.cache, events=src.events, enqueue=src.queue.add,
                       also=web.endpoint.move if web.endpoint is not None else None)
    # A detected address can change under us (Tailscale up after login, DHCP, another
    # Wi-Fi): follow it. An address given with --host-ip is the user's word and stays.
    watcher = AddressWatcher(host.choice, move, interval=cfg.registration.address_check_interval,
                             ) if host.choice is not None and cfg.registration.register else None
    feed = PowerFeed(door.client, cfg.power.interval_ms / 1000) if door is not None else None
    sampler = PowerSampler(src.registry, interval_ms=cfg.power.interval_ms,
                           on_sample=feed) if cfg.power.enabled else None
    return Agent(cfg, host, api, http, src.registry, src.metrics, fatal_exits, src.queue, src.intake, src.isvcs,
                 src.models, src.processes, src.model_files, src.events, watchdog, guard, fleet, registrar, address,
                 reconciler, Runner(src.queue, reconciler, src.metrics, after=door.pusher.changed if door else None),
                 sweep, readiness, heartbeats, web, watcher, sampler, door, sleep, mac)
