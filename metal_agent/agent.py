"""The daemon: wires informers, reconciler, supervisors, HTTP and power sampler together.

This is the composition root's runtime half (the CLI parses flags into an
`AgentConfig` and calls `run_agent`). Nothing here holds business rules; it
builds the parts, starts them in the right order, and shuts them down so
that, by default, llama-servers outlive the agent and are adopted by the
next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp
import psutil
import structlog
from aiohttp import web
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from metal_agent import __version__
from metal_agent.adapters import host_cpu, llama_binary
from metal_agent.adapters.host_facts import read_host_facts, register_host_info
from metal_agent.adapters.http_server import Listeners, create_app
from metal_agent.adapters.host_address import AddressWatcher, detect_host_ip
from metal_agent.adapters.kube.agent_registrar import AgentRegistrar
from metal_agent.adapters.kube.authorizer import KubeAuthorizer
from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import CustomResource, Informer
from metal_agent.adapters.kube.registrar import Registrar
from metal_agent.adapters.kube.status_writer import StatusWriter
from metal_agent.adapters.kube.secrets import SecretTokenReader
from metal_agent.adapters.memory_watchdog import MemoryWatchdog, system_memory
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.adapters.refusal_log import RefusalLog
from metal_agent.adapters.powermetrics import PowerSampler, check_sudo_grant
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.adapters.process.records import RecordStore
from metal_agent.adapters.process.supervisor import SupervisorSettings
from metal_agent.agent_endpoint import MetricsEndpoint
from metal_agent.core.agent_registration import DEFAULT_AGENT_NAMESPACE
from metal_agent.core.claim import Allowlist
from metal_agent.core.host_address import Choice, bind_address
from metal_agent.core.names import GROUP, ISVC_PLURAL, MODEL_PLURAL, VERSION
from metal_agent.core.pressure import MemoryReading
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.core.review_limits import GLOBAL_RATE, PER_SOURCE_RATE, ReviewLimiter
from metal_agent.core.status_owner import StatusMode
from metal_agent.memory_guard import MemoryGuard
from metal_agent.metrics import AgentMetrics, FatalExitLog, service_labels
from metal_agent.paths import AgentPaths
from metal_agent.reconciler import LaunchSettings, Reconciler
from metal_agent.adapters.downloads import HF_ENDPOINT
from metal_agent.core.download_limits import DEFAULT_FREE_MARGIN, DEFAULT_MAX_SIZE, DownloadLimits
from metal_agent.core.egress import policy as egress_policy
from metal_agent.core.engine import EngineName
from metal_agent.tasks import LOOP_BACKOFF, cancel_and_wait, supervised_loop

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    llama_server: str
    paths: AgentPaths
    mlx_server: str | None = None  # mlx_lm.server to run MLX Models with (None: look in the venv, Homebrew, PATH)
    default_runtime: str = "llama-server"  # the engine of Models whose format names none (`custom`)
    kubeconfig: str | None = None
    context: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    host_ip: str | None = None  # registered in EndpointSlices; None: auto-detect
    bind_all: bool = False  # llama-server listens on every interface instead of host_ip only
    register: bool = True  # publish Service + EndpointSlice for each service
    register_metrics: bool = True  # with register: serve /metrics on the registered address and publish it
    agent_namespace: str = DEFAULT_AGENT_NAMESPACE  # where the `metal-agent` Service and this Mac's slice go
    heartbeat_interval: float = 60.0  # 3x margin to LLMKube's 3-minute staleness; each one costs its controller a write
    status_mode: str = "auto"  # auto | full | shared: see core/status_owner.py
    address_check_interval: float = 15.0  # re-detect a detected host address this often
    memory_fraction: float | None = None  # None: 0.67 of RAM up to 36 GiB, 0.75 above
    memory_check_mode: str = "enforce"  # or "warn": admit when the estimate cannot be made
    eviction: bool = False  # evict at Critical memory pressure (opt-in)
    memory_interval: float = 5.0
    memory_reader: Callable[[], Awaitable[MemoryReading]] | None = None  # tests inject readings
    power: bool = False  # sample Apple SoC power with `sudo powermetrics` (macOS only)
    power_interval_ms: int = 1000
    http_host: str = "127.0.0.1"
    http_port: int = 9090
    http_allowed_hosts: tuple[str, ...] = ()  # Host names besides loopback and the listened address (core/request_guard.py)
    token_review_rate: float = PER_SOURCE_RATE  # reviews of unknown tokens per second per source (core/review_limits.py)
    token_review_global_rate: float = GLOBAL_RATE  # ... from all sources together
    threads: int | None = None
    mlock: bool = True
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
    stop_on_exit: bool = False
    resync_period: float = 600.0
    concurrency: int = 8
    allowlist: tuple[str, ...] = ()  # --inference-service-allowlist entries (core.claim.Allowlist); empty: all
    # Fleet mode (metal_agent/fleet.py): several Macs place services among themselves with Leases.
    fleet: bool = False
    fleet_namespace: str = "metal-agent"
    member_name: str | None = None  # None: from the host name
    labels: tuple[tuple[str, str], ...] = ()  # --label k=v
    lease_duration: float = 40.0
    lease_renew_interval: float = 10.0
    fleet_bid_step: float = 2.0
    # What specs may do beyond the built-in rules (--allow-extra-arg, --allowed-model-roots); None:
    # nothing beyond them, model sources in the model store only (cli.spec_policy_flags builds it).
    policy: SpecPolicy | None = None
    download_allow_networks: tuple[str, ...] = ()  # --download-allow-network: beyond public addresses
    token_hosts: tuple[str, ...] = ()  # --token-hosts: beyond the hub endpoint's host
    max_download_size: int = DEFAULT_MAX_SIZE
    download_free_margin: int = DEFAULT_FREE_MARGIN


async def _find_mlx_server(explicit: str | None) -> tuple[str, ...]:
    """How to start mlx_lm.server, or () without one: MLX Models then wait (RuntimeMissing), others run."""
    from metal_agent.adapters import mlx_binary

    path = mlx_binary.find_mlx_server(explicit)
    found = await mlx_binary.probe(path) if path else "not found in the agent's venv, Homebrew or PATH"
    if isinstance(found, str):
        (log.warning if explicit else log.info)("mlx_lm.server unavailable; MLX models will not start", why=found)
        return ()
    log.info("mlx_lm.server found", command=list(found.command), mlx_lm_version=found.version)
    return found.command


class StartupError(Exception):
    """A configuration the agent cannot start with (bad kubeconfig, busy port): say so, exit 2."""


class AgentExit(Exception):
    """A subsystem failed for good; the agent exits non-zero so launchd restarts it."""

    def __init__(self, subsystem: str, message: str) -> None:
        super().__init__(message)
        self.subsystem = subsystem


async def _api_client(cfg: AgentConfig) -> client.ApiClient:
    """The one API client of the agent: every call has a default timeout (adapters.kube.client)."""
    configuration = client.Configuration()
    try:
        await config.load_kube_config(config_file=cfg.kubeconfig, context=cfg.context,
                                      client_configuration=configuration)
    except Exception as err:  # noqa: BLE001 - YAML, missing files, exec plugins...: all mean "fix the kubeconfig"
        where = cfg.kubeconfig or "~/.kube/config (or $KUBECONFIG)"
        raise StartupError(f"cannot load kubeconfig {where}: {err}") from None
    return api_client(configuration)


def _services_view(reconciler: Reconciler) -> list[dict]:
    """What `metal-agent status` shows: one row per supervised service."""
    now = time.time()
    rows = []
    for key, supervisor in sorted(reconciler.processes.supervisors.items()):
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


async def run_agent(cfg: AgentConfig, *, stop: asyncio.Event | None = None, handle_signals: bool = True) -> None:
    """Run until `stop` is set or SIGTERM/SIGINT arrives; raise AgentExit on fatal failure."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)

    info = await llama_binary.probe(cfg.llama_server)
    mlx = await _find_mlx_server(cfg.mlx_server)
    threads = cfg.threads or await host_cpu.performance_core_count()
    choice: Choice | None = None
    if cfg.host_ip:
        host_ip, why = cfg.host_ip, "given by --host-ip"
    else:
        choice = await asyncio.to_thread(detect_host_ip)  # may ask `tailscale ip -4`
        host_ip, why = choice.address, choice.reason
    bind = bind_address(host_ip, cfg.bind_all)
    log.info("starting metal-agent", version=__version__, llama_server=info.path, llama_version=info.version,
             threads=threads, namespaces=list(cfg.namespaces) or "all", host_ip=host_ip, host_ip_reason=why,
             bind=bind, register=cfg.register, status_mode=cfg.status_mode)
    for directory in (cfg.paths.state, cfg.paths.logs, cfg.paths.models):
        directory.mkdir(parents=True, exist_ok=True)

    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    facts = await read_host_facts()
    register_host_info(registry, facts, __version__)
    fatal_exits = FatalExitLog(cfg.paths.state / "fatal_exits.json", metrics.fatal_exits)
    await asyncio.to_thread(fatal_exits.load)
    api = await _api_client(cfg)
    http = aiohttp.ClientSession()
    reconciler: Reconciler | None = None

    def on_isvc(old, new):
        reconciler.on_isvc_change(old, new)

    def on_model(old, new):
        reconciler.on_model_change(old, new)

    informers: list[Informer] = []

    def on_watch_failure(resource: str):
        def record(failures: int) -> None:
            # One gauge for both watches: the worse of the two is what matters.
            metrics.watch_consecutive_failures.set(max(i.consecutive_failures for i in informers))
            if failures:
                metrics.watch_failures.labels(resource).inc()
        return record

    isvcs = Informer(api, CustomResource(GROUP, VERSION, ISVC_PLURAL), on_isvc, namespaces=cfg.namespaces or None,
                     resync_period=cfg.resync_period, on_failure=on_watch_failure(ISVC_PLURAL),
                     on_relist=lambda why: metrics.watch_relists.labels(ISVC_PLURAL, why).inc())
    models = Informer(api, CustomResource(GROUP, VERSION, MODEL_PLURAL), on_model, namespaces=cfg.namespaces or None,
                      resync_period=cfg.resync_period, on_failure=on_watch_failure(MODEL_PLURAL),
                      on_relist=lambda why: metrics.watch_relists.labels(MODEL_PLURAL, why).inc())
    informers += [isvcs, models]
    processes = ProcessManager(
        records=RecordStore(cfg.paths.state / "processes"), log_dir=cfg.paths.logs, http=http,
        on_change=lambda key, snap, event: reconciler.on_process_change(key, snap, event), settings=cfg.supervisor,
        on_probe=lambda key, seconds: metrics.health_check_duration.labels(**service_labels(key)).observe(seconds),
    )
    processes.load_adoptable()
    if kept := processes.supervise_recorded():
        log.info("supervising the previous agent's llama-servers until the cluster is read", services=kept)
    registrar = Registrar(api, agent_version=__version__, host=facts.host)
    # HF_ENDPOINT: huggingface_hub's own variable, for a mirror of the hub (hf:// sources).
    hf_endpoint = os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
    model_files = ModelFiles(cfg.paths.models, registry=registry, token_provider=SecretTokenReader(api),
                             hf_endpoint=hf_endpoint,
                             egress=egress_policy(cfg.download_allow_networks, cfg.token_hosts, hf_endpoint),
                             limits=DownloadLimits(cfg.max_download_size, cfg.download_free_margin))
    model_files.default_engine = EngineName(cfg.default_runtime)
    watchdog = MemoryWatchdog(
        registry, services=lambda: reconciler.memory_view(), evict=lambda key: reconciler.evict(key),
        unblock=lambda keys: reconciler.unblock(keys),
        on_level_change=lambda old, new: reconciler.on_pressure_change(old, new),
        on_eviction_skipped=lambda reason, message: reconciler.eviction_skipped(reason, message),
        reader=cfg.memory_reader or system_memory, interval=cfg.memory_interval,
        memory_fraction=cfg.memory_fraction, eviction_enabled=cfg.eviction,
    )
    memory = MemoryGuard(model_files, registry, mode=cfg.memory_check_mode, agent_fraction=cfg.memory_fraction,
                         is_blocked=watchdog.is_blocked)
    fleet = None
    if cfg.fleet:
        from metal_agent.fleet_wiring import build_fleet

        fleet = build_fleet(
            cfg, api, host=facts.host, chip=facts.chip, total_ram=facts.memory_bytes, version=__version__,
            isvcs=isvcs, models=models, memory=memory, model_files=model_files, events=lambda: reconciler.events,
            on_key=lambda key: reconciler.queue.add(key),
            process_ready=lambda key: bool((s := processes.get(key)) and s.snapshot.ready),
            waiting=lambda key: reconciler.waiting_reason(key), address=lambda: reconciler.launch.register_address,
            state_dir=cfg.paths.state, registrar_kwargs={"host": facts.host}, registry=registry,
        )
        registrar = fleet.registrar
    reconciler = Reconciler(
        isvcs=isvcs, models=models, processes=processes, model_files=model_files, memory=memory,
        status=StatusWriter(api), events=EventRecorder(api, dropped=metrics.events_dropped), metrics=metrics,
        launch=LaunchSettings(llama_server=info.path, host=bind, threads=threads, mlock=cfg.mlock,
                              mlock_style=info.mlock_style, verbosity_flag=info.dialect.verbosity_flag,
                              no_jinja=info.dialect.no_jinja, register_address=host_ip if cfg.register else None,
                              mlx_server=mlx, default_engine=cfg.default_runtime, no_slots=info.dialect.no_slots,
                              policy=cfg.policy or SpecPolicy(model_roots=(str(cfg.paths.models),))),
        registrar=registrar, concurrency=cfg.concurrency, status_mode=StatusMode(cfg.status_mode),
        allowlist=fleet.fleet if fleet else Allowlist(cfg.allowlist),
    )

    model_files.on_ready = model_files.on_progress = reconciler.queue.add

    # A detected address can change under us (Tailscale up after login, DHCP, another
    # Wi-Fi): follow it. An address given with --host-ip is the user's word and stays.
    def on_address_change(change) -> None:
        reconciler.on_address_change(change.old.address, change.new.address, change.new.reason,
                                     bind_address(change.new.address, cfg.bind_all))
        if endpoint is not None:
            endpoint.move(change.new.address)

    watcher = AddressWatcher(choice, on_address_change, interval=cfg.address_check_interval,
                             ) if choice is not None and cfg.register else None

    heartbeats_failing_since: float | None = None

    def readiness() -> bool | str:
        """Ready means: the caches are full and the API answers. Not ready says why."""
        since = [i.unreachable_since for i in informers if i.unreachable_since is not None]
        if heartbeats_failing_since is not None:  # a quiet watch notices a blackhole only at its timeout
            since.append(heartbeats_failing_since)
        if since:
            return (f"API server unreachable for {time.monotonic() - min(since):.0f}s; "
                    f"supervising {len(processes.supervisors)} llama-server(s) locally")
        if not reconciler.synced:
            return "waiting for the first list of InferenceServices and Models"
        return True

    # Requests a browser could have forged are refused; those that do not arrive on loopback
    # need a token the cluster vouches for, and reviews of unknown tokens are budgeted.
    authorizer = KubeAuthorizer(api, limiter=ReviewLimiter(per_source_rate=cfg.token_review_rate,
                                                           global_rate=cfg.token_review_global_rate),
                                reviews_counter=metrics.token_reviews)
    refusals = RefusalLog(counter=metrics.http_refusals)
    app = create_app(registry, ready=readiness, authorize=authorizer.authorize, refusals=refusals,
                     allowed_hosts=frozenset(h.lower() for h in (*cfg.http_allowed_hosts, cfg.http_host)
                                             if h not in ("0.0.0.0", "::", "")))
    listeners = Listeners(app)
    # The cluster's Prometheus finds this agent at its registered address (core/agent_registration.py).
    endpoint = MetricsEndpoint(
        listeners, AgentRegistrar(api, agent_version=__version__), namespace=cfg.agent_namespace,
        host=facts.host, chip=facts.chip, address=host_ip, port=cfg.http_port, listen_host=cfg.http_host,
        interval=cfg.heartbeat_interval,
    ) if cfg.register and cfg.register_metrics else None

    async def services(_: web.Request) -> web.Response:
        return web.json_response({"version": __version__, "services": _services_view(reconciler)})

    app.router.add_get("/v1/services", services)
    if fleet is not None:
        from metal_agent.fleet_wiring import add_routes

        add_routes(app, fleet.fleet)

    async def after_sync() -> None:
        await isvcs.synced.wait()
        await models.synced.wait()
        while not reconciler.synced:  # fleet: until the Leases are read and ours renewed
            await asyncio.sleep(0.2)
        reconciler.resync_all()
        await reconciler.queue.wait_idle()
        failures = 0
        while True:
            try:
                await reconciler.sweep_unwanted(cfg.namespaces or None)
                break
            except Exception as err:  # noqa: BLE001 - API trouble: try again, never give up on cleanup
                failures += 1
                delay = LOOP_BACKOFF.delay(failures)
                log.warning("start-up cleanup failed; retrying", error=f"{type(err).__name__}: {err}",
                            retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
        log.info("initial sync complete", services=len(processes.supervisors))

    async def heartbeats() -> None:
        """Refresh the slices' heartbeat annotation. A round that meets the API away or a
        dropped connection is logged and the next round tries again; anything else is a bug,
        left to `supervised_loop`."""
        nonlocal heartbeats_failing_since
        while True:
            # While the API is away, try every few seconds: the first heartbeat after an outage
            # is what tells LLMKube (and /readyz) that this Mac is back.
            await asyncio.sleep(cfg.heartbeat_interval if heartbeats_failing_since is None
                                else min(cfg.heartbeat_interval, 2.0))
            if cfg.register:
                try:
                    sent, failed = await registrar.heartbeat()
                except (ApiException, aiohttp.ClientError, OSError) as err:  # OSError covers timeouts
                    log.warning("heartbeat round failed; next round retries", error=f"{type(err).__name__}: {err}")
                    sent = failed = 1
                if sent and failed == sent:
                    heartbeats_failing_since = heartbeats_failing_since or time.monotonic()
                elif sent:
                    heartbeats_failing_since = None

    # Built once: its gauges are registered on `registry`, so a restarted loop reuses it.
    sampler = PowerSampler(registry, interval_ms=cfg.power_interval_ms) if cfg.power else None

    async def power() -> None:
        grant = await check_sudo_grant(cfg.power_interval_ms)
        if not grant.ok:
            log.error("powermetrics sudo grant is not usable; power gauges stay at 0 until it is",
                      status=grant.status, detail=grant.detail, fix=grant.fix)
        await sampler.run()

    async def housekeeping() -> None:
        """Once a minute: cap llama-server log sizes, refresh per-process RSS."""
        while True:
            await asyncio.sleep(60)
            try:
                await processes.rotate_logs()
            except OSError as err:  # a full disk: the logs grow until there is room, the agent keeps going
                log.warning("log rotation failed; retrying in a minute", error=f"{type(err).__name__}: {err}")
            for row in _services_view(reconciler):
                if row["rss_bytes"] is not None:
                    metrics.process_rss.labels(**service_labels(row["service"])).set(row["rss_bytes"])

    fatal: AgentExit | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            await listeners.start()
            stack.push_async_callback(listeners.close)
            stack.callback(refusals.close)
            try:
                await listeners.add(cfg.http_host, cfg.http_port)
            except OSError as err:
                raise StartupError(f"cannot listen on {cfg.http_host}:{cfg.http_port} ({err.strerror}); "
                                   "pass another --listen address") from None
            reconciler.queue.metrics = metrics.workqueue
            reconciler.queue.start()
            # No loop ends the agent: a failure is logged, counted in loop_failures_total and
            # restarted (the watches retry an absent API by themselves, for as long as it takes,
            # and the supervisors keep the models healthy meanwhile). Only a stop request ends it.
            loops = {"watch-inferenceservices": isvcs.run, "watch-models": models.run,
                     "heartbeats": heartbeats, "housekeeping": housekeeping, "memory-watchdog": watchdog.run}
            if sampler is not None:
                loops["power"] = power
            if watcher is not None:
                loops["address-watch"] = watcher.run
            if endpoint is not None:
                loops["metrics-endpoint"] = endpoint.run
            if fleet is not None:
                loops["fleet"] = fleet.run
            background = [asyncio.create_task(supervised_loop(name, factory, metrics.loop_failures), name=name)
                          for name, factory in loops.items()]
            sync = asyncio.create_task(after_sync())
            try:
                await stop.wait()
            finally:
                await cancel_and_wait(*(t for t in [sync, *background] if not t.done()))
                # Side by side: an API server that does not answer costs the shutdown one
                # timeout, not two in a row.
                await asyncio.gather(reconciler.shutdown(stop_processes=cfg.stop_on_exit),
                                     *([endpoint.withdraw()] if endpoint is not None else []))
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
            await asyncio.to_thread(fatal_exits.record, fatal.subsystem)
        except OSError as err:
            log.warning("could not record the fatal exit", error=f"{type(err).__name__}: {err}")
        raise fatal
    log.info("metal-agent stopped", left_running=not cfg.stop_on_exit)
