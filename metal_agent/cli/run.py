"""`metal-agent run`: the daemon's flags (each also a METAL_AGENT_* variable).

It also accepts every flag of LLMKube's Go Metal Agent, in Go's spellings
(`-flag value`, `--flag=false`, durations like `1s`), so the Go agent's
launchd job starts this agent unchanged: `GoCompatCommand` rewrites them
into ours before parsing (the table is `metal_agent.core.go_flags`), and
the ones we have no use for are named in one warning at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from types import SimpleNamespace
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from metal_agent import __version__
from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.app.config import (AgentConfig, ControllerSettings, DownloadSettings, EngineSettings, FleetConfig,
                                    FrontDoorSettings,
                                    HttpSettings, KubeSettings, MacSettings, MemorySettings, PowerSettings,
                                    RegistrationSettings)
from metal_agent.core.go_flags import describe_ignored, normalize_run_argv
from metal_agent.core.go_values import GoFlagError
from metal_agent.core.host_address import NoUsableAddress, validate_host_ip
from metal_agent.cli.spec_policy_flags import allow_extra_arg_option, allowed_model_roots_option, build_policy
from metal_agent.core.names import is_dns1123_label
from metal_agent.paths import AgentPaths, default_paths, find_llama_server

EXIT_FATAL = 3  # launchd restarts the agent on a non-zero exit
GO_IGNORED = "metal_agent.go_flags_ignored"  # ctx.meta key: the Go agent's flags we ignore


def _env(name: str) -> str:
    return f"METAL_AGENT_{name}"


class GoCompatCommand(TyperCommand):
    """`run` as a click command that first rewrites LLMKube's Go agent's flags into ours.

    Done on the argv, before click sees it, because click cannot parse Go's
    syntax at all (`-model-store` would read as `-m odel-store`, and a bool
    flag given `=false` is an error); the Go-only flags are hidden from
    `--help` and the README's option table by not being options at all.
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        takes_value = {
            opt for param in self.params
            if getattr(param, "param_type_name", "") == "option" and not getattr(param, "is_flag", False)
            for opt in (*param.opts, *param.secondary_opts)
        }
        try:
            normalized = normalize_run_argv(args, takes_value)
        except GoFlagError as err:
            # What the Go agent would say, then click's exit code for a usage error.
            typer.echo(f"{ctx.get_usage()}\nError: {err}", err=True)
            raise typer.Exit(2) from None
        ctx.meta[GO_IGNORED] = normalized.ignored
        return super().parse_args(ctx, normalized.argv)


IO_THREADS = 4


async def _with_io_threads(main):
    """Run `main` with a small pool for the agent's blocking file work (log reads, hashing,
    records). asyncio's default pool grows to cores + 4 threads, and on glibc every thread
    that allocates gets a malloc arena of its own: measured 24 MB more RSS with 10
    services, for no gain (the work is short, or one long hash at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(IO_THREADS, thread_name_prefix="metal-agent-io"))
    return await main


def _file_reader(path: Path):
    from metal_agent.adapters.memory_watchdog import file_reader

    return file_reader(path)


def _bytes(text: str, flag: str, minimum: int) -> int:
    """A byte quantity flag ("256Gi", "500G", "0")."""
    from metal_agent.core.quantity import parse_quantity

    value = parse_quantity(text.strip())
    if value is None or value < minimum or value != int(value):
        raise typer.BadParameter(f"expected a whole number of bytes of at least {minimum}, e.g. 256Gi or 500G",
                                 param_hint=flag)
    return int(value)


def _quantity(value: int) -> str:
    """A byte default as its flag spells it (256Gi)."""
    gib = 2**30
    return f"{value // gib}Gi" if value % gib == 0 else str(value)


def _print_version(value: bool) -> None:
    """The Go agent's `-version` (also `metal-agent --version`)."""
    if value:
        typer.echo(f"metal-agent {__version__}")
        raise typer.Exit()


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise typer.BadParameter("expected " + ", ".join(allowed[:-1]) + " or " + allowed[-1], param_hint=flag)
    return value


def _parsed(ctx: typer.Context, name: str, parse, flag: str | None = None):
    """`parse` the flag's value; a ValueError is a usage error naming the flag."""
    try:
        return parse(ctx.params[name])
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint=flag) from None


def _fleet_config(ctx: typer.Context) -> FleetConfig:
    from metal_agent.core.leases import member_name as to_member_name
    from metal_agent.fleet.wiring import parse_labels

    o = SimpleNamespace(**ctx.params)
    labels = _parsed(ctx, "label", parse_labels, "--label")
    if o.member_name is not None and to_member_name(o.member_name) != o.member_name:
        raise typer.BadParameter(f"{o.member_name!r} is not a DNS label; try {to_member_name(o.member_name)!r}",
                                 param_hint="--member-name")
    if o.lease_renew_interval * 2 > o.lease_duration:
        raise typer.BadParameter("must be at most half of --lease-duration", param_hint="--lease-renew-interval")
    return FleetConfig(enabled=o.fleet, namespace=o.fleet_namespace, member_name=o.member_name,
                       labels=tuple(labels.items()), lease_duration=o.lease_duration,
                       lease_renew_interval=o.lease_renew_interval, bid_step=o.fleet_bid_step)


def _registration(ctx: typer.Context) -> RegistrationSettings:
    o = SimpleNamespace(**ctx.params)
    if not is_dns1123_label(o.agent_namespace):
        raise typer.BadParameter("expected a namespace name (DNS-1123 label)", param_hint="--agent-namespace")
    host_ip = o.host_ip
    if host_ip is not None:
        # Without registration nothing outside this Mac needs the address: loopback is fine.
        host_ip = _parsed(ctx, "host_ip", lambda v: validate_host_ip(v, registered=o.register), "--host-ip")
    return RegistrationSettings(register=o.register, register_metrics=o.register_metrics,
                                agent_namespace=o.agent_namespace, host_ip=host_ip, bind_all=o.bind_all,
                                heartbeat_interval=o.heartbeat_interval,
                                address_check_interval=o.address_check_interval)


def _http(ctx: typer.Context) -> HttpSettings:
    o = SimpleNamespace(**ctx.params)
    http_host, _, http_port = o.listen.rpartition(":")
    if not http_host or not http_port.isdigit():
        raise typer.BadParameter("expected host:port, e.g. 127.0.0.1:9090", param_hint="--listen")
    return HttpSettings(host=http_host.strip("[]"), port=int(http_port),
                        allowed_hosts=tuple(h.strip().lower() for item in o.http_allowed_host
                                            for h in item.split(",") if h.strip()),
                        token_review_rate=o.token_review_rate, token_review_global_rate=o.token_review_global_rate)


def _downloads(ctx: typer.Context) -> DownloadSettings:
    from metal_agent.core.egress import parse_networks, parse_token_hosts

    o = SimpleNamespace(**ctx.params)
    networks = _parsed(ctx, "download_allow_network", parse_networks, "--download-allow-network")
    return DownloadSettings(allow_networks=tuple(str(net) for net in networks),
                            token_hosts=_parsed(ctx, "token_hosts", parse_token_hosts, "--token-hosts"),
                            max_size=_bytes(o.max_download_size, "--max-download-size", minimum=1),
                            free_margin=_bytes(o.download_free_margin, "--download-free-margin", minimum=0))


def _warn(line: str) -> None:
    """A start-up warning on stderr. launchd points stderr at a file on the Mac's disk: a full
    disk must not stop the agent from starting (its logging drops lines the same way)."""
    with contextlib.suppress(OSError):
        typer.echo(line, err=True)


# The front door is on by default (issue 21); its flags are documented like the rest.
_FRONT_DOOR_HIDDEN = False


def _front_door(ctx: typer.Context) -> FrontDoorSettings:
    o = SimpleNamespace(**ctx.params)
    if not 0 <= o.client_port <= 65535:
        raise typer.BadParameter("expected a TCP port (0: off)", param_hint="--client-port")
    asked = getattr(ctx.get_parameter_source("client_port"), "name", "DEFAULT") != "DEFAULT"
    if not o.front_door and o.client_port and asked:
        _warn(f"warning: --client-port {o.client_port} is not served with --no-front-door (the front door "
              "serves it)")
    import shlex

    from metal_agent.core.access import AccessSettings

    access = _choice(o.front_door_access, ("cluster", "open"), "--front-door-access")
    networks = tuple(n.strip() for item in o.front_door_allow_network for n in item.split(",") if n.strip())
    try:
        AccessSettings(mode=access, allow_networks=networks)  # refuses a malformed CIDR, naming it
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--front-door-allow-network")
    return FrontDoorSettings(enabled=o.front_door, client_port=o.client_port, queue=o.front_door_queue,
                             queue_timeout=o.front_door_queue_timeout, access=access, allow_networks=networks,
                             command=tuple(shlex.split(o.front_door_command or "")))


def _mac(ctx: typer.Context) -> MacSettings:
    o = SimpleNamespace(**ctx.params)
    return MacSettings(prevent_sleep=_choice(o.prevent_sleep, ("auto", "always", "never"), "--prevent-sleep"),
                       caffeinate=o.caffeinate, sysctl=o.sysctl, pmset=o.pmset,
                       readings_interval=o.mac_readings_interval)


def _agent_config(ctx: typer.Context) -> AgentConfig:
    """The settings from the parsed flags; a flag that makes no sense is a usage error naming it."""
    from metal_agent.core.claim import Allowlist

    o = SimpleNamespace(**ctx.params)
    allowed = _parsed(ctx, "allowlist", Allowlist.parse, "--inference-service-allowlist")
    fleet, registration = _fleet_config(ctx), _registration(ctx)
    status_mode = _choice(o.status_mode, ("auto", "full", "shared"), "--status-mode")
    memory_check_mode = _choice(o.memory_check_mode, ("enforce", "warn"), "--memory-check-mode")
    http = _http(ctx)
    if o.api_unreachable_limit is not None:
        _warn("warning: --api-unreachable-limit is ignored: the agent keeps supervising its models "
              "through an API outage of any length (see /readyz)")
    downloads = _downloads(ctx)
    default_runtime = _choice(o.default_runtime, ("llama-server", "mlx-lm"), "--default-runtime")
    defaults = default_paths()
    try:
        policy = build_policy(o.allow_extra_arg, o.allowed_model_roots, o.model_dir or defaults.models)
    except ValueError as err:
        raise typer.BadParameter(str(err))
    binary = find_llama_server(o.llama_server)
    if binary is None:
        typer.echo("error: llama-server not found; install llama.cpp (brew install llama.cpp) or pass --llama-server PATH", err=True)
        raise typer.Exit(2)
    return AgentConfig(
        paths=AgentPaths(o.model_dir or defaults.models, o.log_dir or defaults.logs, o.state_dir or defaults.state),
        engines=EngineSettings(llama_server=binary, mlx_server=o.mlx_server, default_runtime=default_runtime,
                               threads=o.threads, mlock=o.mlock),
        kube=KubeSettings(kubeconfig=str(o.kubeconfig) if o.kubeconfig else None, context=o.context,
                          namespaces=tuple(n for item in o.namespace for n in item.split(",") if n)),
        controller=ControllerSettings(status_mode=status_mode, allowlist=allowed.entries, policy=policy,
                                      stop_on_exit=o.stop_on_exit),
        registration=registration, http=http,
        memory=MemorySettings(fraction=o.memory_fraction, check_mode=memory_check_mode, eviction=o.eviction,
                              min_own_share=o.eviction_min_own_share,
                              interval=o.memory_interval,
                              reader=_file_reader(o.memory_readings_file) if o.memory_readings_file else None),
        power=PowerSettings(enabled=sys.platform == "darwin" if o.power is None else o.power,
                            interval_ms=o.power_interval_ms),
        downloads=downloads, fleet=fleet, front_door=_front_door(ctx), mac=_mac(ctx),
        supervisor=SupervisorSettings(startup_timeout=o.startup_timeout, liveness_interval=o.liveness_interval,
                                      liveness_failures=o.liveness_failures),
    )


def _say_ignored_go_flags(ctx: typer.Context) -> None:
    """Once, at start: the Go agent's flags this run was given and ignores (they stay in its plist)."""
    if ignored := ctx.meta.get(GO_IGNORED):
        import structlog

        structlog.get_logger(__name__).warning(
            "ignoring flags of LLMKube's Go agent: " + describe_ignored(ignored),
            flags=sorted({item.flag for item in ignored}))


def run(
    ctx: typer.Context,
    kubeconfig: Optional[Path] = typer.Option(None, envvar=["METAL_AGENT_KUBECONFIG", "KUBECONFIG"], help="Kubeconfig file (default: ~/.kube/config)."),
    context: Optional[str] = typer.Option(None, envvar=_env("CONTEXT"), help="Kubeconfig context to use."),
    namespace: List[str] = typer.Option([], "--namespace", "-n", envvar=_env("NAMESPACES"), help="Namespace to watch (repeat for several; default: all)."),
    llama_server: Optional[str] = typer.Option(None, envvar=_env("LLAMA_SERVER"), help="llama-server binary (default: Homebrew's, then PATH)."),
    mlx_server: Optional[str] = typer.Option(None, envvar=_env("MLX_SERVER"), help="mlx_lm.server for MLX Models (default: the agent's venv, Homebrew, then PATH; none: MLX Models wait)."),
    default_runtime: str = typer.Option(EngineSettings.default_runtime, envvar=_env("DEFAULT_RUNTIME"), help="Engine for Models whose format names none (custom): llama-server or mlx-lm. GGUF is always llama-server, MLX mlx-lm."),
    host_ip: Optional[str] = typer.Option(None, envvar=_env("HOST_IP"), help="This Mac's address as the cluster reaches it (default: Tailscale, then the default route's interface)."),
    bind_all: bool = typer.Option(RegistrationSettings.bind_all, "--bind-all", envvar=_env("BIND_ALL"), help="Listen on all interfaces (default: only on --host-ip): the front door's service ports, or with --no-front-door each engine."),
    register: bool = typer.Option(RegistrationSettings.register, "--register/--no-register", envvar=_env("REGISTER"), help="Publish a Service and EndpointSlice per model (off: supervise only, e.g. for local use)."),
    register_metrics: bool = typer.Option(RegistrationSettings.register_metrics, "--register-metrics/--no-register-metrics", envvar=_env("REGISTER_METRICS"), help="With --register: also serve /metrics on the registered address (a bearer token the cluster vouches for is required) and publish it as this Mac's EndpointSlice of the `metal-agent` Service, for the cluster's Prometheus."),
    agent_namespace: str = typer.Option(RegistrationSettings.agent_namespace, envvar=_env("AGENT_NAMESPACE"), help="Namespace of the `metal-agent` Service that --register-metrics publishes this Mac's metrics endpoint in."),
    heartbeat_interval: float = typer.Option(RegistrationSettings.heartbeat_interval, min=1, envvar=_env("HEARTBEAT_INTERVAL"), help="Seconds between EndpointSlice heartbeats (LLMKube calls a slice stale after 180; each heartbeat costs LLMKube's controller a status write)."),
    address_check_interval: float = typer.Option(RegistrationSettings.address_check_interval, min=0.1, envvar=_env("ADDRESS_CHECK_INTERVAL"), help="Seconds between checks of this Mac's address when it was detected (not given with --host-ip); a change seen twice re-registers and respawns what listened on the old one."),
    status_mode: str = typer.Option(ControllerSettings.status_mode, envvar=_env("STATUS_MODE"), help="Who writes InferenceService status: auto (decide per object from the cluster), full (the agent writes all of it: CRDs only), shared (LLMKube's controller runs; the agent writes only its own fields)."),
    state_dir: Optional[Path] = typer.Option(None, envvar=_env("STATE_DIR"), help="Process records for adoption across restarts."),
    log_dir: Optional[Path] = typer.Option(None, envvar=_env("LOG_DIR"), help="Per-service llama-server logs."),
    model_dir: Optional[Path] = typer.Option(None, envvar=_env("MODEL_DIR"), help="Downloaded models."),
    listen: str = typer.Option(HttpSettings().listen, envvar=_env("LISTEN"), help="host:port for /metrics, /healthz, /readyz and the local status API."),
    http_allowed_host: List[str] = typer.Option([], "--http-allowed-host", envvar=_env("HTTP_ALLOWED_HOSTS"), help="A host name the agent's HTTP endpoint may be addressed by besides loopback and the address it listens on (repeat, or comma-separated), e.g. a DNS name Prometheus scrapes this Mac by. Any other Host header is refused (DNS rebinding)."),
    token_review_rate: float = typer.Option(HttpSettings.token_review_rate, min=0.01, envvar=_env("TOKEN_REVIEW_RATE"), help="TokenReviews per second one source address may cause with tokens the agent has not seen allowed (a burst of ten seconds' worth); beyond it the answer is 429 and nothing is sent to the API server."),
    token_review_global_rate: float = typer.Option(HttpSettings.token_review_global_rate, min=0.01, envvar=_env("TOKEN_REVIEW_GLOBAL_RATE"), help="TokenReviews per second all source addresses together may cause with unknown tokens (a burst of two seconds' worth); recently allowed tokens never wait behind them."),
    threads: Optional[int] = typer.Option(None, min=1, envvar=_env("THREADS"), help="llama-server --threads (default: performance-core count)."),
    mlock: bool = typer.Option(EngineSettings.mlock, "--mlock/--no-mlock", envvar=_env("MLOCK"), help="Pin model memory (llama-server --mlock)."),
    startup_timeout: float = typer.Option(SupervisorSettings.startup_timeout, min=1, envvar=_env("STARTUP_TIMEOUT"), help="Seconds a model may take to load."),
    liveness_interval: float = typer.Option(SupervisorSettings.liveness_interval, min=0.1, envvar=_env("LIVENESS_INTERVAL"), help="Seconds between /health probes of a ready server."),
    liveness_failures: int = typer.Option(SupervisorSettings.liveness_failures, min=1, envvar=_env("LIVENESS_FAILURES"), help="Failed probes in a row before a restart."),
    stop_on_exit: bool = typer.Option(ControllerSettings.stop_on_exit, "--stop-on-exit", envvar=_env("STOP_ON_EXIT"), help="Stop llama-servers when the agent exits (default: leave them for the next agent to adopt)."),
    api_unreachable_limit: Optional[float] = typer.Option(None, envvar=_env("API_UNREACHABLE_LIMIT"), hidden=True, help="Ignored (kept so existing installs start): the agent no longer exits while the API server is away."),
    memory_fraction: Optional[float] = typer.Option(None, min=0.05, max=1.0, envvar=_env("MEMORY_FRACTION"), help="Share of RAM all models together may use (default: 0.67 up to 36 GiB RAM, 0.75 above); a Model's memoryBudget/memoryFraction wins."),
    memory_check_mode: str = typer.Option(MemorySettings.check_mode, envvar=_env("MEMORY_CHECK_MODE"), help="enforce: refuse a model whose memory cannot be estimated; warn: start it anyway."),
    eviction: bool = typer.Option(MemorySettings.eviction, "--eviction-enabled/--eviction-disabled", envvar=_env("EVICTION_ENABLED"), help="At critical memory pressure, stop one service per check (lowest priority first) until pressure is Normal."),
    eviction_min_own_share: float = typer.Option(MemorySettings.min_own_share, "--eviction-min-own-share", min=0.0, max=0.99, envvar=_env("EVICTION_MIN_OWN_SHARE"), help="At critical pressure, evict only when this agent's services hold more than this share of the memory in use (0: whatever the cause); otherwise MemoryPressure says the pressure comes from other processes."),
    memory_interval: float = typer.Option(MemorySettings.interval, min=0.5, envvar=_env("MEMORY_INTERVAL"), help="Seconds between memory pressure checks."),
    memory_readings_file: Optional[Path] = typer.Option(None, hidden=True, help="Drills and tests: read memory from this JSON file instead of the system (see adapters/memory_watchdog.file_reader)."),
    power: Optional[bool] = typer.Option(None, "--power/--no-power", envvar=_env("POWER"), help="Sample Apple SoC power with the pinned `sudo powermetrics` command (default: on for macOS; see make install-powermetrics-sudo)."),
    power_interval_ms: int = typer.Option(PowerSettings.interval_ms, min=100, max=60000, envvar=_env("POWER_INTERVAL_MS"), help="powermetrics sample interval; must equal the interval in the sudoers grant."),
    prevent_sleep: str = typer.Option(MacSettings.prevent_sleep, envvar=_env("PREVENT_SLEEP"), help="Keep the Mac from idle sleep with a `caffeinate -i` child: auto (while at least one model serves or loads), always (while the agent runs) or never. A closed lid without external display and power, and sleep the owner asks for, still happen."),
    caffeinate: str = typer.Option(MacSettings.caffeinate, hidden=True, help="Tests: the caffeinate to run (default /usr/bin/caffeinate)."),
    sysctl: str = typer.Option(MacSettings.sysctl, hidden=True, help="Tests: the sysctl to read iogpu.wired_limit_mb and hw.memsize with."),
    pmset: str = typer.Option(MacSettings.pmset, hidden=True, help="Tests: the pmset to read `-g therm` with."),
    mac_readings_interval: float = typer.Option(MacSettings.readings_interval, min=0.1, hidden=True, help="Seconds between reads of the GPU wired-memory ceiling and the thermal state."),
    log_level: str = typer.Option("info", envvar=_env("LOG_LEVEL"), help="debug, info, warning or error."),
    log_format: str = typer.Option("auto", envvar=_env("LOG_FORMAT"), help="auto (text on a TTY, else JSON), json or text."),
    allowlist: List[str] = typer.Option([], "--inference-service-allowlist", envvar=_env("INFERENCE_SERVICE_ALLOWLIST"), help="Serve only these InferenceServices: NAME or NAMESPACE/NAME, comma-separated or repeated (default: every Metal one). Several Macs sharing a cluster each list their own."),
    fleet: bool = typer.Option(FleetConfig.enabled, "--fleet/--no-fleet", envvar=_env("FLEET"), help="Share services with the other Macs of the cluster: each is placed on Macs that fit it (nodeSelector, affinity, memory), spec.replicas Macs serve it, and it moves when its Mac goes away (see Fleets in the README)."),
    fleet_namespace: str = typer.Option(FleetConfig.namespace, envvar=_env("FLEET_NAMESPACE"), help="Namespace of the fleet's Leases (one per Mac, one per replica)."),
    member_name: Optional[str] = typer.Option(None, envvar=_env("MEMBER_NAME"), help="This Mac's name in the fleet (default: its host name as a DNS label)."),
    label: List[str] = typer.Option([], "--label", envvar=_env("LABELS"), help="A label of this Mac for nodeSelector/affinity, KEY=VALUE (repeat, or comma-separated); kubernetes.io/hostname, llmkube.ai/chip and llmkube.ai/memory-gib are added."),
    lease_duration: float = typer.Option(FleetConfig.lease_duration, min=1, envvar=_env("LEASE_DURATION"), help="Fleet: seconds without a renewal after which a Mac's replicas move to other Macs."),
    lease_renew_interval: float = typer.Option(FleetConfig.lease_renew_interval, min=0.1, envvar=_env("LEASE_RENEW_INTERVAL"), help="Fleet: seconds between renewals of this Mac's Lease (one API write each)."),
    fleet_bid_step: float = typer.Option(FleetConfig.bid_step, min=0.0, envvar=_env("FLEET_BID_STEP"), help="Fleet: seconds a Mac waits per place in a service's preference order before taking a free replica."),
    allow_extra_arg: List[str] = allow_extra_arg_option(),
    allowed_model_roots: List[str] = allowed_model_roots_option(),
    download_allow_network: List[str] = typer.Option([], "--download-allow-network", envvar=_env("DOWNLOAD_ALLOW_NETWORKS"), help="A network model downloads may reach besides public addresses, CIDR or address (repeat, or comma-separated), e.g. the LAN of a NAS serving models; loopback, link-local and private addresses are refused otherwise, for sources and redirects alike."),
    token_hosts: List[str] = typer.Option([], "--token-hosts", envvar=_env("TOKEN_HOSTS"), help="A host that may receive a Model's sourceSecretRef token, besides the Hugging Face endpoint (repeat, or comma-separated; *.example.com for its subdomains). Tokens go only over https and never follow a redirect to another host."),
    max_download_size: str = typer.Option(_quantity(DownloadSettings.max_size), envvar=_env("MAX_DOWNLOAD_SIZE"), help="Largest model file a download may write (quantity, e.g. 256Gi); a file of unknown size is downloaded only when the Model pins its sha256."),
    download_free_margin: str = typer.Option(_quantity(DownloadSettings.free_margin), envvar=_env("DOWNLOAD_FREE_MARGIN"), help="Free disk space a download must leave on the model volume (quantity, e.g. 5Gi), checked before and while writing; below it the download stops and its partial file is removed."),
    front_door: bool = typer.Option(FrontDoorSettings.enabled, "--front-door/--no-front-door", envvar=_env("FRONT_DOOR"), hidden=_FRONT_DOOR_HIDDEN, help="Serve every model through the front door (the default): a stable port per service (its EndpointSlice points there), engines on 127.0.0.1, requests held across respawns and agent restarts, who may call checked, and the client port. --no-front-door: each engine listens on the Mac's address and its slice points at it; anyone who can route to the Mac can call it (the Go agent's behaviour), and there is no client port."),
    client_port: int = typer.Option(FrontDoorSettings.client_port, envvar=_env("CLIENT_PORT"), hidden=_FRONT_DOOR_HIDDEN, help="127.0.0.1:PORT serves the OpenAI API of every model, routed by the request's model (the Go agent's --client-port; 0: off; nothing with --no-front-door)."),
    front_door_queue: int = typer.Option(FrontDoorSettings.queue, min=0, envvar=_env("FRONT_DOOR_QUEUE"), hidden=_FRONT_DOOR_HIDDEN, help="Requests the front door holds per service beyond its parallel slots; beyond them, 429 with Retry-After."),
    front_door_queue_timeout: float = typer.Option(FrontDoorSettings.queue_timeout, min=0.1, envvar=_env("FRONT_DOOR_QUEUE_TIMEOUT"), hidden=_FRONT_DOOR_HIDDEN, help="Seconds a held request waits for a slot (or for its engine to be ready) before 429/503."),
    front_door_access: str = typer.Option(FrontDoorSettings.access, envvar=_env("FRONT_DOOR_ACCESS"), hidden=_FRONT_DOOR_HIDDEN, help="Who may call the front door from the network: cluster (loopback, the cluster's Node addresses and pod CIDRs, --front-door-allow-network, a service's API key, a ServiceAccount token allowed inferenceservices/proxy) or open (anyone who can route to the Mac, the Go agent's behaviour)."),
    front_door_allow_network: List[str] = typer.Option([], envvar=_env("FRONT_DOOR_ALLOW_NETWORK"), hidden=_FRONT_DOOR_HIDDEN, help="A CIDR let through the front door without a credential (repeatable), besides loopback and the cluster's own."),
    front_door_command: Optional[str] = typer.Option(None, envvar=_env("FRONT_DOOR_COMMAND"), hidden=True, help="Tests and drills: the command that starts the front door (default: this python -m metal_agent front-door); --socket and --state-dir are appended."),
    version: bool = typer.Option(False, "--version", hidden=True, is_eager=True, callback=_print_version, help="Print the version and exit."),
) -> None:
    """Run the agent: watch InferenceServices and serve the Metal ones with native llama-server."""
    # The agent (Kubernetes client, aiohttp, metrics) is imported here, not at the top:
    # every `metal-agent` invocation imports this module to build its command table.
    from metal_agent.adapters.llama_binary import LlamaServerMissing
    from metal_agent.app.build import StartupError
    from metal_agent.app.manager import AgentExit, run_agent
    from metal_agent.logging_setup import configure_logging

    try:
        configure_logging(log_level, log_format)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--log-level")
    _say_ignored_go_flags(ctx)
    cfg = _agent_config(ctx)
    try:
        asyncio.run(_with_io_threads(run_agent(cfg)))
    except (LlamaServerMissing, NoUsableAddress, StartupError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    except AgentExit as err:
        typer.echo(f"error: {err.subsystem}: {err}", err=True)
        raise typer.Exit(EXIT_FATAL)
