"""Run the real metal-agent daemon as a child process, the way launchd would.

The agent runs as its own process (not in the test's event loop) so tests
can SIGKILL it and start a new one, exactly the situation adoption is for.
It authenticates with the agent identity's kubeconfig, so every API call it
makes passes through the real RBAC authorizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import aiohttp

from tests.support import netns as netns_module
from tests.support.netns import NetNS
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for


TEST_MODEL_NETWORK = "127.0.0.0/8"  # where tests/support/http_models.py serves models


@dataclass
class AgentOptions:
    kubeconfig: Path
    llama_server: Path
    workdir: Path
    namespaces: Sequence[str] = ()
    host_ip: str | None = None  # None: supervise only (--no-register, llama-server on 127.0.0.1)
    detect_host: bool = False  # register, but let the agent detect (and follow) its address itself
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    netns: NetNS | None = None  # run the agent (and so its llama-servers) inside this namespace
    log_level: str = "debug"  # tests want everything in the log they quote on failure; benches use info
    # --allowed-model-roots. None: where tests keep models (the asset cache, the temp dir, the work dir),
    # so file:// test Models are served; security tests give their own narrow list.
    model_roots: Sequence[str] | None = None
    download_networks: Sequence[str] = (TEST_MODEL_NETWORK,)  # --download-allow-network (the owner's flag)
    # --client-port. The front door is on by default and its client port is 127.0.0.1:9999 (the Go
    # agent's); tests run side by side on one machine, so each agent gets a free port of its own
    # (None) unless a test names one (0: off). Inside a network namespace loopback is private, yet
    # a free port changes nothing there either.
    client_port: int | None = None


# Every state directory an agent of this test run used: the front door outlives its agent by
# design (an agent restart must drop no request), so the teardown stops it (`reap_front_doors`).
STATE_DIRS: set[Path] = set()


def _test_roots(workdir: Path) -> list[str]:
    import tempfile

    cache = os.environ.get("METAL_AGENT_CACHE") or os.path.expanduser("~/.cache/metal-agent")
    return [cache, tempfile.gettempdir(), str(workdir)]


class AgentProcess:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.port = free_port()
        # The agent's HTTP API listens on loopback, inside the namespace too; there the test
        # reaches it through a socket opened in the namespace (`_get`): loopback is where it
        # is open. A registering agent also listens on its registered address, token-checked
        # (`metrics_url`).
        self.listen_host = "127.0.0.1"
        self.url = f"http://{self.listen_host}:{self.port}"
        self.metrics_url = f"http://{options.netns.inner_ip}:{self.port}/metrics" if options.netns else None
        self.client_port = free_port() if options.client_port is None else options.client_port
        STATE_DIRS.add(options.workdir / "state")
        self.starts = 0
        self.process: ManagedProcess | None = None

    def argv(self) -> list[str]:
        o = self.options
        argv = [
            sys.executable, "-m", "metal_agent", "run",
            "--kubeconfig", str(o.kubeconfig),
            "--llama-server", str(o.llama_server),
            "--state-dir", str(o.workdir / "state"),
            "--log-dir", str(o.workdir / "logs"),
            "--model-dir", str(o.workdir / "models"),
            "--listen", f"{self.listen_host}:{self.port}",
            *([] if o.detect_host else ["--host-ip", o.host_ip] if o.host_ip else
              ["--host-ip", "127.0.0.1", "--no-register"]),
            "--threads", "1",
            "--no-mlock",
            "--log-format", "json",
            "--log-level", o.log_level,
            "--allowed-model-roots", ",".join(o.model_roots if o.model_roots is not None else _test_roots(o.workdir)),
            # The owner's flag that lets downloads reach the tests' model servers (on loopback, also
            # inside a network namespace); without it the agent refuses them like any non-public address.
            *(arg for net in o.download_networks for arg in ("--download-allow-network", net)),
            "--client-port", str(self.client_port),
            # In a network namespace the root namespace (where the API server runs) plays the cluster's
            # node: the front door lets it in as it would a Node's address (access `cluster`).
            *(["--front-door-allow-network", f"{o.netns.outer_ip}/32"] if o.netns else []),
            *o.extra_args,
        ]
        for ns in o.namespaces:
            argv += ["--namespace", ns]
        return o.netns.wrap(argv) if o.netns else argv

    async def start(self, wait_ready: bool = True) -> None:
        self.starts += 1
        env = dict(os.environ, **self.options.env)
        self.process = ManagedProcess("metal-agent", self.argv(), self.options.workdir / f"agent-{self.starts}.log", env=env)
        await self.process.start()
        if wait_ready:
            await wait_for(self.ready, timeout=60, what="metal-agent /readyz", on_timeout=self.process.tail)

    async def _get(self, path: str) -> tuple[int, str]:
        if self.options.netns is not None:
            return await netns_module.http_get_in(self.options.netns, self.port, path)
        async with aiohttp.ClientSession() as http:
            async with http.get(self.url + path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status, await resp.text()

    async def ready(self) -> bool:
        if self.process is None or not self.process.running:
            raise RuntimeError(f"metal-agent exited\n{self.process.tail() if self.process else ''}")
        try:
            return (await self._get("/readyz"))[0] == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def metrics(self) -> str:
        return (await self._get("/metrics"))[1]

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        wanted = "{" + ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items())) + "}" if labels else ""
        for line in (await self.metrics()).splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if series == name + wanted or (not labels and series == name):
                return float(value)
        return None

    async def services(self) -> list[dict]:
        return json.loads((await self._get("/v1/services"))[1])["services"]

    def log_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.options.workdir.glob("agent-*.log"))
        )

    async def stop(self) -> int | None:
        return await self.process.stop(grace=20) if self.process else None

    def kill(self) -> None:
        """SIGKILL the agent alone (not its process group): its llama-servers must survive."""
        os.kill(self.process.pid, 9)


def kill_recorded_processes(state_dir: Path) -> None:
    """Teardown safety net: SIGKILL every llama-server (and the front door) an agent recorded
    under `state_dir` that is provably still that process, so a failed test never leaves one behind."""
    import signal

    from metal_agent.adapters.process.records import RecordStore, live_process

    for record in RecordStore(state_dir / "processes").load_all():
        if live_process(record):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)
    kill_front_door(state_dir)


def kill_front_door(state_dir: Path) -> None:
    """SIGKILL the front door recorded under `state_dir` if it is provably that process."""
    import signal

    from metal_agent.adapters.process.front_door_process import RECORD_FILE, resolve_record
    from metal_agent.adapters.process.records import live_process

    record = resolve_record(state_dir / RECORD_FILE)
    if record is not None and record.pid > 0 and live_process(record):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)


def reap_front_doors(under: Path | None = None) -> None:
    """After each test: no front door an agent of it started outlives the test, whether the agent
    was an AgentProcess (its state directory is known) or run in the test's own process (then its
    front door's state directory is under this pytest run's temporary directory, `under`)."""
    while STATE_DIRS:
        kill_front_door(STATE_DIRS.pop())
    if under is None:
        return
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "front-door" not in argv or "--state-dir" not in argv[:-1]:
            continue
        state = Path(argv[argv.index("--state-dir") + 1])
        if state.is_relative_to(under):
            kill_front_door(state)


@contextlib.asynccontextmanager
async def agents_in_netns(*, kubeconfig: Path, api_port: int, llama_server: Path, workdir: Path,
                          namespaces: Sequence[str], extra_args: Sequence[str] = ()):
    """A "Mac": a network namespace with a routable address, and a factory for agents in it
    that register that address and reach the API server (root namespace, `api_port`) through
    a forward, as the identity of `kubeconfig`. Yields (namespace, make_agent); on exit every
    agent is stopped and no recorded llama-server survives."""
    async with netns_module.network_namespace() as ns:
        forwarder, agent_kubeconfig = await netns_module.kubeconfig_into(
            ns, kubeconfig, workdir / "agent-in-netns.kubeconfig", api_port)
        agents: list[AgentProcess] = []

        def make_agent(*extra: str, detect_host: bool = False) -> AgentProcess:
            agent = AgentProcess(AgentOptions(
                kubeconfig=agent_kubeconfig, llama_server=llama_server, workdir=workdir, namespaces=namespaces,
                host_ip=ns.inner_ip, detect_host=detect_host, netns=ns, extra_args=(*extra_args, *extra),
            ))
            agents.append(agent)
            return agent

        try:
            yield ns, make_agent
        finally:
            for agent in agents:
                if agent.process and agent.process.running:
                    await agent.stop()
            kill_recorded_processes(workdir / "state")
            forwarder.close()
