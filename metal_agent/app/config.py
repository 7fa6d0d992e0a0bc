"""The agent's settings, grouped by the part they configure, each default written once.

`metal-agent run` takes its flag defaults from here (cli/run.py), tests build
these objects naming only what they change, and `app.build` hands each group
to the part it configures. Light on purpose: the CLI imports this module for
every `metal-agent` invocation, so nothing here may pull in the Kubernetes
client, aiohttp or prometheus_client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable

from metal_agent.adapters.process.settings import SupervisorSettings
from metal_agent.core.agent_registration import DEFAULT_AGENT_NAMESPACE
from metal_agent.core.download_limits import DEFAULT_FREE_MARGIN, DEFAULT_MAX_SIZE
from metal_agent.core.pressure import DEFAULT_MIN_OWN_SHARE, MemoryReading
from metal_agent.core.review_limits import GLOBAL_RATE, PER_SOURCE_RATE
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.fleet.settings import FleetSettings
from metal_agent.paths import AgentPaths


@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: str | None = None
    context: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    resync_period: float = 600.0


@dataclass(frozen=True)
class EngineSettings:
    llama_server: str = "llama-server"  # the CLI resolves the binary (Homebrew's, then PATH)
    mlx_server: str | None = None  # mlx_lm.server to run MLX Models with (None: look in the venv, Homebrew, PATH)
    default_runtime: str = "llama-server"  # the engine of Models whose format names none (`custom`)
    threads: int | None = None  # None: the performance-core count
    mlock: bool = True


@dataclass(frozen=True)
class ControllerSettings:
    status_mode: str = "auto"  # auto | full | shared: see core/status_owner.py
    concurrency: int = 8
    allowlist: tuple[str, ...] = ()  # --inference-service-allowlist entries (core.claim.Allowlist); empty: all
    # What specs may do beyond the built-in rules (--allow-extra-arg, --allowed-model-roots); None:
    # nothing beyond them, model sources in the model store only (cli.spec_policy_flags builds it).
    policy: SpecPolicy | None = None
    stop_on_exit: bool = False


@dataclass(frozen=True)
class RegistrationSettings:
    register: bool = True  # publish Service + EndpointSlice for each service
    register_metrics: bool = True  # with register: serve /metrics on the registered address and publish it
    agent_namespace: str = DEFAULT_AGENT_NAMESPACE  # where the `metal-agent` Service and this Mac's slice go
    host_ip: str | None = None  # registered in EndpointSlices; None: auto-detect
    bind_all: bool = False  # llama-server listens on every interface instead of host_ip only
    heartbeat_interval: float = 60.0  # 3x margin to LLMKube's 3-minute staleness; each one costs its controller a write
    address_check_interval: float = 15.0  # re-detect a detected host address this often


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 9090
    allowed_hosts: tuple[str, ...] = ()  # Host names besides loopback and the listened address (core/request_guard.py)
    token_review_rate: float = PER_SOURCE_RATE  # reviews of unknown tokens per second per source (core/review_limits.py)
    token_review_global_rate: float = GLOBAL_RATE  # ... from all sources together

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MemorySettings:
    fraction: float | None = None  # None: 0.67 of RAM up to 36 GiB, 0.75 above
    check_mode: str = "enforce"  # or "warn": admit when the estimate cannot be made
    eviction: bool = False  # evict at Critical memory pressure (opt-in)
    min_own_share: float = DEFAULT_MIN_OWN_SHARE  # evict only when our services hold more of the memory in use
    interval: float = 5.0
    reader: Callable[[], Awaitable[MemoryReading]] | None = None  # tests inject readings


@dataclass(frozen=True)
class PowerSettings:
    enabled: bool = False  # sample Apple SoC power with `sudo powermetrics` (macOS only)
    interval_ms: int = 1000


@dataclass(frozen=True)
class MacSettings:
    """The Mac itself (issue 23): idle sleep while serving, the GPU's wired-memory ceiling, heat."""

    prevent_sleep: str = "auto"  # auto (while >= 1 service serves or loads) | always | never
    caffeinate: str = "/usr/bin/caffeinate"  # tests: a stand-in
    sysctl: str = "/usr/sbin/sysctl"  # tests: a stand-in replaying recorded output
    pmset: str = "/usr/bin/pmset"  # tests: a stand-in replaying recorded output
    readings_interval: float = 30.0  # seconds between reads of the wired ceiling and thermal state
    sleep_check_interval: float = 1.0  # seconds between checks of whether the assertion is wanted


@dataclass(frozen=True)
class DownloadSettings:
    allow_networks: tuple[str, ...] = ()  # --download-allow-network: beyond public addresses
    token_hosts: tuple[str, ...] = ()  # --token-hosts: beyond the hub endpoint's host
    max_size: int = DEFAULT_MAX_SIZE
    free_margin: int = DEFAULT_FREE_MARGIN


@dataclass(frozen=True)
class FleetConfig:
    """Fleet mode (metal_agent/fleet/): several Macs place services among themselves with Leases.

    The defaults are the fleet's own (`fleet.settings.FleetSettings`), written once there.
    """

    enabled: bool = False
    namespace: str = FleetSettings.namespace
    member_name: str | None = None  # None: from the host name
    labels: tuple[tuple[str, str], ...] = ()  # --label k=v
    lease_duration: float = FleetSettings.lease_duration
    lease_renew_interval: float = FleetSettings.renew_interval
    bid_step: float = FleetSettings.bid_step


@dataclass(frozen=True)
class FrontDoorSettings:
    """The front door (issue 21): one process in front of every engine, on by default so no
    model is open to anyone on the LAN and the Go agent's client port keeps working."""

    enabled: bool = True  # --no-front-door: engines on the Mac's address, no stable ports, no client port
    client_port: int = 9999  # 127.0.0.1:PORT serves every model (the Go agent's --client-port); 0: off
    queue: int = 64  # requests held per service beyond its parallel slots
    queue_timeout: float = 30.0  # seconds a held request waits before 429/503
    access: str = "cluster"  # --front-door-access: cluster (loopback, Nodes, pod CIDRs, listed networks, keys, tokens) | open
    allow_networks: tuple[str, ...] = ()  # --front-door-allow-network: CIDRs let in without a credential
    restart_backoff_cap: float = 10.0  # the front door process is restarted this often at most when it keeps dying
    command: tuple[str, ...] = ()  # how to start it (tests, drills); (): `<the agent's python> -m metal_agent front-door`


@dataclass(frozen=True)
class AgentConfig:
    paths: AgentPaths
    engines: EngineSettings = EngineSettings()
    kube: KubeSettings = KubeSettings()
    controller: ControllerSettings = ControllerSettings()
    registration: RegistrationSettings = RegistrationSettings()
    http: HttpSettings = HttpSettings()
    memory: MemorySettings = MemorySettings()
    power: PowerSettings = PowerSettings()
    mac: MacSettings = MacSettings()
    downloads: DownloadSettings = DownloadSettings()
    fleet: FleetConfig = FleetConfig()
    front_door: FrontDoorSettings = FrontDoorSettings()
    supervisor: SupervisorSettings = field(default_factory=SupervisorSettings)
