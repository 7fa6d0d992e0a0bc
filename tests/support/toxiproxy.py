"""Toxiproxy between the agent and the real kube-apiserver, and a prober that
measures what a fault does to the EndpointSlices the agent publishes.

Toxiproxy (built from its Go module by `scripts/build-toxiproxy.sh`) is a TCP
proxy whose behaviour is changed at run time through its HTTP API. The agent
is given a kubeconfig pointing at the proxy instead of the API server; TLS
passes through untouched (the API server's certificate names 127.0.0.1,
which is where the proxy listens), so the agent still authenticates with its
own client certificate under RBAC. The tests and the bench, as cluster
admins, keep talking to the API server directly, so they can change objects
and read slices while the agent's link is broken.

Toxics used by the fault tests (all on every connection, new or existing):

- `blackhole()`: `timeout` toxics with timeout 0 both ways: connections are
  accepted, every byte is dropped, nothing is ever closed (a Mac whose
  network changed without a reset);
- `reset_peer()`: every connection is reset (RST) on its first byte;
- `latency(ms, jitter)`: each chunk from the API server is delayed;
- `limit_data(bytes)`: each connection from the API server is closed after
  `bytes` more bytes (a watch stream cut in the middle of an event);
- `bandwidth(KB/s)`: what comes from the API server trickles;
- `disable()` / `enable()`: connections refused (the proxy stops listening).

`SliceProber` plays LLMKube's controller and kube-proxy: every 100 ms it
reads the slices (admin identity, straight to the API server) and asks each
registered endpoint for `/health`, and counts *wrong-ready* time: a slice
saying ready while its endpoint does not answer, or not ready (or absent)
while it does.

`faulty_mac()` / `FaultyMac`: the "Mac" both the fault tests and
`bench/faults.py` use: agents in a network namespace (so their slices carry a
reachable address) whose API traffic goes through the proxy, with the checks
that say whether everything has converged after a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import aiohttp
import psutil
import yaml
from kubernetes_asyncio import client

from tests.support import netns
from tests.support.agent import AgentProcess, agents_in_netns
from tests.support.isvc import GROUP, MERGE_PATCH, VERSION, Cluster
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for

BINARY = "toxiproxy-server"
_names = itertools.count(1)


class ToxiproxyError(RuntimeError):
    pass


class ToxiproxyServer:
    """toxiproxy-server on a free 127.0.0.1 port, with an async client for its API."""

    def __init__(self, directory: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = ManagedProcess(
            "toxiproxy-server",
            [str(directory / BINARY), "-host", "127.0.0.1", "-port", str(self.port)],
            workdir / "toxiproxy.log",
        )
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.process.start()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await wait_for(self._answers, timeout=30, what="toxiproxy-server API", on_timeout=self.process.tail)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self.process.stop(grace=5)

    async def _answers(self) -> bool:
        if not self.process.running:
            raise ToxiproxyError(f"toxiproxy-server exited\n{self.process.tail()}")
        try:
            return (await self.request("GET", "/version")) is not None
        except (aiohttp.ClientError, OSError):
            return False

    async def request(self, method: str, path: str, body: dict | None = None):
        assert self._http is not None, "start() first"
        async with self._http.request(method, self.url + path, json=body) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ToxiproxyError(f"{method} {path}: HTTP {resp.status}: {text.strip()}")
            if not text:
                return {}
            try:
                return json.loads(text)
            except ValueError:
                return text

    async def create_proxy(self, upstream: str, name: str | None = None) -> "Proxy":
        """A proxy listening on a kernel-chosen 127.0.0.1 port, forwarding to `upstream` (host:port)."""
        name = name or f"proxy-{next(_names)}"
        created = await self.request("POST", "/proxies",
                                     {"name": name, "listen": "127.0.0.1:0", "upstream": upstream, "enabled": True})
        return Proxy(self, name, upstream, int(created["listen"].rsplit(":", 1)[1]))

    async def reset(self) -> None:
        """Every proxy enabled, every toxic removed."""
        await self.request("POST", "/reset")


@dataclass
class Proxy:
    server: ToxiproxyServer
    name: str
    upstream: str
    port: int  # where clients connect (127.0.0.1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def add_toxic(self, kind: str, *, stream: str = "downstream", toxicity: float = 1.0,
                        name: str | None = None, **attributes) -> str:
        """Add a toxic; returns its name. `stream`: downstream (server -> client) or upstream."""
        name = name or f"{kind}-{stream}-{next(_names)}"
        await self.server.request("POST", f"/proxies/{self.name}/toxics", {
            "name": name, "type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes})
        return name

    async def remove_toxic(self, name: str) -> None:
        await self.server.request("DELETE", f"/proxies/{self.name}/toxics/{name}")

    async def toxics(self) -> list[dict]:
        return await self.server.request("GET", f"/proxies/{self.name}/toxics")

    async def clear(self) -> None:
        for toxic in await self.toxics():
            await self.remove_toxic(toxic["name"])

    # -- the faults -------------------------------------------------------

    async def blackhole(self) -> list[str]:
        """Drop every byte both ways, close nothing (timeout toxic, timeout 0)."""
        return [await self.add_toxic("timeout", stream=s, timeout=0) for s in ("upstream", "downstream")]

    async def reset_peer(self, after_ms: int = 0) -> list[str]:
        """Reset (RST) every connection on its first byte (after `after_ms`), both ways."""
        return [await self.add_toxic("reset_peer", stream=s, timeout=after_ms) for s in ("upstream", "downstream")]

    async def latency(self, ms: int, jitter_ms: int = 0) -> list[str]:
        """Delay every chunk from the API server by ms ± jitter_ms."""
        return [await self.add_toxic("latency", stream="downstream", latency=ms, jitter=jitter_ms)]

    async def bandwidth(self, kib_per_s: int) -> list[str]:
        """Throttle what comes from the API server to `kib_per_s` KB/s."""
        return [await self.add_toxic("bandwidth", stream="downstream", rate=kib_per_s)]

    async def limit_data(self, nbytes: int) -> list[str]:
        """Close each connection once `nbytes` more bytes came from the API server."""
        return [await self.add_toxic("limit_data", stream="downstream", bytes=nbytes)]

    async def disable(self) -> None:
        """Stop listening and close every connection: the API refuses connections."""
        await self.server.request("POST", f"/proxies/{self.name}", {"enabled": False})

    async def enable(self) -> None:
        await self.server.request("POST", f"/proxies/{self.name}", {"enabled": True})

    @contextlib.asynccontextmanager
    async def fault(self, kind: str, *args, **kwargs) -> AsyncIterator[list[str]]:
        """`async with proxy.fault("blackhole"):` the toxics are on inside the block, off after it."""
        names = await getattr(self, kind)(*args, **kwargs)
        try:
            yield names
        finally:
            for name in names:
                with contextlib.suppress(ToxiproxyError):
                    await self.remove_toxic(name)

    async def delete(self) -> None:
        with contextlib.suppress(ToxiproxyError, aiohttp.ClientError):
            await self.server.request("DELETE", f"/proxies/{self.name}")


def kubeconfig_via(source: Path, target: Path, port: int, host: str = "127.0.0.1") -> Path:
    """A copy of kubeconfig `source` whose server is https://host:port (same CA, same client cert)."""
    config = yaml.safe_load(source.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://{host}:{port}"
    target.write_text(yaml.safe_dump(config))
    return target


@dataclass
class ToxicAPI:
    """What the `toxic_api` fixture hands out: the proxy in front of the API server, and a
    kubeconfig for the agent identity that goes through it."""

    proxy: Proxy
    kubeconfig: Path


# -- wrong-ready time ------------------------------------------------------

MANAGED = "llmkube.ai/managed-by=metal-agent"
ISVC_LABEL = "llmkube.ai/inference-service"


@dataclass
class Truth:
    """What the prober saw of one service's slice."""

    wrong_seconds: float = 0.0  # slice ready != endpoint healthy, summed
    longest_wrong: float = 0.0  # the longest such stretch
    dead_seconds: float = 0.0  # of those, slice ready while the endpoint does not answer
    longest_dead: float = 0.0
    streak: float = 0.0
    dead_streak: float = 0.0
    samples: int = 0
    ready_samples: int = 0
    last: tuple | None = None  # (ready, healthy, port) at the last sample
    last_began: float = float("-inf")  # time.monotonic() when the last counted sample began
    wrong_log: list[tuple[float, bool, bool, int | None]] = field(default_factory=list)


# A prober that did not look cannot vouch for anything (`SliceProber.saw_enough`).
MIN_SAMPLES = 5
MAX_UNKNOWN_SHARE = 0.25


class ProberBlind(AssertionError):
    """The prober's figures would be zeros for want of samples, not for want of faults."""


class SliceProber:
    """Every `interval` seconds: read the slices of `namespace`, ask each endpoint for /health.

    A service whose slice is absent or not ready is checked at the port its slice
    last named: a healthy answer there is "not-ready while it serves". Samples where the API server cannot be read
    are not counted either way (a client would see nothing new then either).
    """

    def __init__(self, api: client.ApiClient, namespace: str, address: str, services: list[str], *,
                 interval: float = 0.1, health_timeout: float = 0.5) -> None:
        self.discovery = client.DiscoveryV1Api(api)
        self.namespace = namespace
        self.address = address
        self.services = list(services)
        self.interval = interval
        self.health_timeout = health_timeout
        self.truth: dict[str, Truth] = {name: Truth() for name in self.services}
        self.ports: dict[str, int] = {}
        self.unknown_samples = 0
        # Raised only by a test whose fault takes the API server itself away (the prober
        # reads it directly): its samples then are unknown to every client too.
        self.max_unknown_share = MAX_UNKNOWN_SHARE
        self.started = time.monotonic()
        self._dt = interval
        self._task: asyncio.Task | None = None
        self._http: aiohttp.ClientSession | None = None

    def watch(self, name: str) -> None:
        """Probe one more service (one created during a fault)."""
        if name not in self.truth:
            self.services.append(name)
            self.truth[name] = Truth()

    def unwatch(self, name: str) -> None:
        if name in self.truth:
            self.services.remove(name)
            del self.truth[name]

    def reset(self) -> None:
        """Start counting afresh (e.g. for the next fault)."""
        self.truth = {name: Truth() for name in self.services}
        self.unknown_samples = 0
        self.started = time.monotonic()

    def start(self) -> "SliceProber":
        self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="slice prober")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> "SliceProber":
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def saw_enough(self) -> None:
        """Fail unless the prober actually looked: every figure below is 0 for a prober
        that never read a slice, and "never wrong" must not be how "never looked" reads.

        Each service needs MIN_SAMPLES successful samples, and at most MAX_UNKNOWN_SHARE
        of all samples may be unknown (the API server unreadable: the prober reads it
        directly, not through the faulty proxy, so unknowns mean the prober is blind).
        """
        if not self.truth:
            raise ProberBlind(f"the prober watched no service\n{self.describe()}")
        thin = {name: t.samples for name, t in self.truth.items() if t.samples < MIN_SAMPLES}
        rounds = max((t.samples for t in self.truth.values()), default=0) + self.unknown_samples
        share = self.unknown_samples / rounds if rounds else 1.0
        if thin or share > self.max_unknown_share:
            raise ProberBlind(f"the prober saw too little to judge: services under {MIN_SAMPLES} samples: {thin or '-'}; "
                              f"unknown share {share:.0%} (limit {self.max_unknown_share:.0%})\n{self.describe()}")

    async def wait_sampled(self, timeout: float = 60, *, since: float | None = None) -> None:
        """Until every probed service has MIN_SAMPLES successful samples: for a test whose
        fault is over quickly, so the prober has looked long enough to vouch for it.

        With `since` (a `time.monotonic()` reading), also until each service has a sample
        that began after it: the prober has looked at the state the test is in now, however
        slowly a loaded machine lets it sample (the interval is a wish, not a promise)."""
        after = float("-inf") if since is None else since

        def looked() -> bool:
            return all(t.samples >= MIN_SAMPLES and t.last_began > after for t in self.truth.values())
        what = f"{MIN_SAMPLES} samples of each probed service" + ("" if since is None else ", one since the mark")
        await wait_for(looked, timeout=timeout, what=what, on_timeout=self.describe)

    def wrong_seconds(self) -> float:
        self.saw_enough()
        return sum(t.wrong_seconds for t in self.truth.values())

    def longest_wrong(self) -> float:
        self.saw_enough()
        return max((t.longest_wrong for t in self.truth.values()), default=0.0)

    def longest_dead(self) -> float:
        """The longest time any slice said ready for an endpoint that did not answer."""
        self.saw_enough()
        return max((t.longest_dead for t in self.truth.values()), default=0.0)

    def describe(self) -> str:
        rows = []
        for name, t in self.truth.items():
            tail = ", ".join(f"+{at:.1f}s ready={r} healthy={h} port={p}" for at, r, h, p in t.wrong_log[-6:])
            rows.append(f"{name}: wrong {t.wrong_seconds:.2f}s (longest {t.longest_wrong:.2f}s; ready for a dead "
                        f"endpoint {t.dead_seconds:.2f}s, longest {t.longest_dead:.2f}s) "
                        f"of {t.samples} samples; last {t.last}; wrong samples: {tail or '-'}")
        return "\n".join(rows + [f"unknown samples (API unreadable): {self.unknown_samples}"])

    async def _healthy(self, port: int | None) -> bool:
        if port is None:
            return False
        try:
            async with self._http.get(f"http://{self.address}:{port}/health",
                                      timeout=aiohttp.ClientTimeout(total=self.health_timeout)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _read(self) -> dict[str, tuple[bool, int | None]] | None:
        try:
            slices = await self.discovery.list_namespaced_endpoint_slice(
                self.namespace, label_selector=MANAGED, _request_timeout=2)
        except Exception:  # noqa: BLE001 - an unreadable API is an unknown sample, not a wrong one
            return None
        seen: dict[str, tuple[bool, int | None]] = {}
        for s in slices.items:
            name = (s.metadata.labels or {}).get(ISVC_LABEL)
            port = s.ports[0].port if s.ports else None
            ready = bool(s.endpoints and s.endpoints[0].conditions and s.endpoints[0].conditions.ready)
            seen[name] = (ready, port)
        return seen

    async def sample(self) -> None:
        began = time.monotonic()
        seen = await self._read()
        if seen is None:
            self.unknown_samples += 1
            return
        for name, (_, port) in seen.items():
            if port:
                self.ports[name] = port
        targets = {name: seen.get(name, (False, None))[1] or self.ports.get(name) for name in self.services}
        health = await asyncio.gather(*(self._healthy(targets[n]) for n in self.services))
        now = time.monotonic()
        for name, healthy in zip(self.services, health):
            t = self.truth[name]
            ready = seen.get(name, (False, None))[0]
            t.samples += 1
            t.last_began = began
            t.ready_samples += ready
            t.last = (ready, healthy, targets[name])
            if ready != healthy:
                t.wrong_log.append((now - self.started, ready, healthy, targets[name]))
                t.streak += self._dt
                t.wrong_seconds += self._dt
                t.longest_wrong = max(t.longest_wrong, t.streak)
            else:
                t.streak = 0.0
            if ready and not healthy:
                t.dead_streak += self._dt
                t.dead_seconds += self._dt
                t.longest_dead = max(t.longest_dead, t.dead_streak)
            else:
                t.dead_streak = 0.0

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            began = time.monotonic()
            # A wrong sample stands for the time since the previous sample (at least one interval).
            self._dt = max(self.interval, began - last)
            last = began
            await self.sample()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))


# -- a "Mac" behind the proxy ------------------------------------------------


def rfc3339(at: float) -> str:
    return dt.datetime.fromtimestamp(int(at), dt.timezone.utc).isoformat().replace("+00:00", "Z")


class FaultyMac:
    """A "Mac" for fault tests and the fault bench: a network namespace whose agents reach the
    API server through a Toxiproxy proxy, and the checks that tell whether it tells the truth."""

    def __init__(self, cluster: Cluster, ns: netns.NetNS, proxy: Proxy, make_agent: Callable[..., AgentProcess],
                 workdir: Path, llama: Path, *, log_level: str = "debug") -> None:
        self.cluster = cluster
        self.log_level = log_level
        self.ns = ns
        self.proxy = proxy
        self._make_agent = make_agent
        self.workdir = workdir
        self.llama = llama
        self.agents: list[AgentProcess] = []
        self.probers: list[SliceProber] = []
        self.why = ""  # what the last convergence check was still waiting for
        self.orphans: set[int] = set()  # llama-servers running that are neither supervised nor recorded

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def agent(self, *extra: str) -> AgentProcess:
        agent = self._make_agent(*extra)
        agent.options.log_level = self.log_level
        self.agents.append(agent)
        return agent

    async def create(self, *names: str, ctx: int = 256) -> None:
        for name in names:
            await self.cluster.create_isvc(name, "tiny", contextSize=ctx)

    async def serve(self, *names: str, agent: AgentProcess | None = None,
                    converge_timeout: float = 60) -> tuple[AgentProcess, dict[str, int]]:
        """Start an agent serving `names`; wait until they are Ready and registered."""
        agent = agent or self.agent()
        await agent.start()
        await self.create(*names)
        await wait_for(lambda: self.converged(agent, names), timeout=converge_timeout,
                       what="services Ready and registered", on_timeout=lambda: self.why)
        return agent, await self.pids(agent)

    async def pids(self, agent: AgentProcess) -> dict[str, int]:
        return {r["service"].split("/", 1)[1]: r["pid"] for r in await agent.services() if r["state"] == "Ready"}

    async def ready_pid(self, agent: AgentProcess, name: str, other_than: int | None = None) -> int | None:
        pid = (await self.pids(agent)).get(name)
        return pid if pid and pid != other_than else None

    def probe(self, names) -> SliceProber:
        prober = SliceProber(self.cluster.api, self.cluster.ns, self.ns.inner_ip, list(names))
        self.probers.append(prober)
        return prober

    def llama_servers(self) -> set[int]:
        """Every live llama-server of this test's "Mac" (they listen on its address)."""
        found = set()
        for proc in psutil.process_iter(["cmdline", "status"]):
            argv = proc.info["cmdline"] or []
            if argv[:1] == [str(self.llama)] and proc.info["status"] != psutil.STATUS_ZOMBIE \
                    and "--host" in argv and argv[argv.index("--host") + 1] == self.ns.inner_ip:
                found.add(proc.pid)
        return found

    def recorded(self) -> dict[str, int]:
        """The agent's records of this test's services (files the agent would name so)."""
        records = {}
        for path in (self.state_dir / "processes").glob(f"{self.cluster.ns}__*.json"):
            with contextlib.suppress(ValueError, OSError, KeyError, TypeError, AttributeError):
                data = json.loads(path.read_text())
                records[data["key"]] = data["pid"]
        return records

    def dump(self, agent: AgentProcess) -> str:
        """What the "Mac" runs, for a failure message (no await: agent rows come from the last check)."""
        return (f"llama-servers running {sorted(self.llama_servers())}, recorded {self.recorded()}, "
                f"agent running {agent.process.running} (exit {agent.process.proc.returncode})")

    async def touch(self, name: str) -> None:
        """A metadata-only change: watch traffic, nothing for the agent to do."""
        await self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.cluster.ns, "inferenceservices", name,
            {"metadata": {"annotations": {"faults.test/touched": str(time.time())}}}, _content_type=MERGE_PATCH)

    async def converged(self, agent: AgentProcess, names, since: float | None = None,
                        ignore: frozenset[int] | set[int] = frozenset()) -> bool:
        """Everything true at once; `since`: slices must carry a heartbeat written after it.
        `ignore`: llama-server pids left out of the "all recorded and supervised" check (known
        orphans); `self.orphans` says which running ones neither are."""
        if not agent.process.running:
            raise AssertionError(f"the agent exited\n{agent.process.tail()}")
        try:
            status, text = await agent._get("/readyz")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
            self.why = f"the agent does not answer: {type(err).__name__}"
            return False
        if status != 200:
            self.why = f"/readyz {status}: {text}"
            return False
        rows = {r["service"].split("/", 1)[1]: r for r in await agent.services()}
        slices = await client.DiscoveryV1Api(self.cluster.api).list_namespaced_endpoint_slice(
            self.cluster.ns, label_selector="llmkube.ai/managed-by=metal-agent")
        by_name = {s.metadata.labels["llmkube.ai/inference-service"]: s for s in slices.items}
        for name in names:
            row = rows.get(name)
            if not row or row["state"] != "Ready":
                self.why = f"{name}: agent row {row}"
                return False
            found = by_name.get(name)
            ep = found.endpoints[0] if found and found.endpoints else None
            if not ep or not ep.conditions.ready or ep.addresses != [self.ns.inner_ip] \
                    or found.ports[0].port != row["port"]:
                self.why = f"{name}: slice {ep} ports {found.ports if found else None}, agent port {row['port']}"
                return False
            beat = found.metadata.annotations.get("llmkube.ai/agent-heartbeat", "")
            if since is not None and beat <= rfc3339(since):
                self.why = f"{name}: heartbeat {beat} not after {rfc3339(since)}"
                return False
            obj = await self.cluster.isvc(name)
            st = obj.get("status") or {}
            cond = next((c for c in st.get("conditions") or [] if c["type"] == "MetalProcessReady"), {})
            if st.get("phase") != "Ready" or cond.get("status") != "True" \
                    or cond.get("observedGeneration") != obj["metadata"]["generation"]:
                self.why = f"{name}: status phase {st.get('phase')}, MetalProcessReady {cond}"
                return False
        running, supervised, recorded = self.llama_servers() - set(ignore), {r["pid"] for r in rows.values()}, set(self.recorded().values())
        self.orphans = running - supervised - recorded
        if not (running == supervised == recorded):
            self.why = f"llama-servers running {running}, supervised {supervised}, recorded {recorded}"
            return False
        self.why = "converged"
        return True

    async def wait_converged(self, agent: AgentProcess, names, since: float | None = None,
                             converge_timeout: float = 60, interval: float = 0.05) -> None:
        await wait_for(lambda: self.converged(agent, names, since), timeout=converge_timeout,
                       what="slices, status, records and /readyz to converge", interval=interval,
                       on_timeout=lambda: self.why)


    # Killing the agent "during a spawn" lands in one of three moments: before the exec, between
    # the exec and the process record, or after the record (while the model loads). The record is
    # written microseconds to milliseconds after the exec, so a plain kill hits the middle one by
    # chance. These freeze the agent (SIGSTOP) to look at it, then kill it where they mean to.
    # Blocking: run them with asyncio.to_thread.

    @staticmethod
    def _freeze(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {pid} did not stop")
            time.sleep(0.0001)

    def _new_children(self, agent_pid: int, known: set[int]) -> tuple[set[int], set[int]]:
        """(new llama-servers the agent started that no record names yet, new ones recorded)."""
        children = {c.pid for c in psutil.Process(agent_pid).children()} & self.llama_servers()
        fresh = children - known
        recorded = set(self.recorded().values())
        return fresh - recorded, fresh & recorded

    def kill_agent_between_exec_and_record(self, agent: AgentProcess, known: set[int], timeout: float = 30) -> bool:
        """SIGKILL the agent while a llama-server it has just exec'd has no record. True if it was
        caught there; False if the record was written first (the agent is killed right after)."""
        pid = agent.process.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._freeze(pid)
            unrecorded, recorded = self._new_children(pid, known)
            if unrecorded or recorded:
                os.kill(pid, signal.SIGKILL)
                return bool(unrecorded)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.0002)
        os.kill(pid, signal.SIGKILL)
        raise TimeoutError("no spawn seen")

    def kill_agent_outside_the_record_window(self, agent: AgentProcess, known: set[int]) -> None:
        """SIGKILL the agent now, unless a llama-server it exec'd is not recorded yet: then just after."""
        pid = agent.process.pid
        self._freeze(pid)
        while self._new_children(pid, known)[0]:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.0002)
            self._freeze(pid)
        os.kill(pid, signal.SIGKILL)

    async def restarts(self, agent: AgentProcess, name: str) -> float:
        return await agent.metric("llmkube_metal_agent_process_restarts_total",
                                  {"name": name, "namespace": self.cluster.ns}) or 0

    async def respawns(self, agent: AgentProcess, name: str) -> float:
        return await agent.metric("llmkube_metal_agent_respawns_total",
                                  {"name": name, "namespace": self.cluster.ns}) or 0


@contextlib.asynccontextmanager
async def faulty_mac(cluster: Cluster, proxy: Proxy, agent_kubeconfig: Path, workdir: Path, llama: Path, *,
                     agent_flags: Sequence[str] = (), log_level: str = "debug") -> AsyncIterator[FaultyMac]:
    """A "Mac" (tests/support/agent.py's agents_in_netns) whose agents reach the API server
    through `proxy`. On exit: probers stopped, toxics removed, agents stopped, and every
    llama-server of the namespace killed, recorded or not."""
    async with agents_in_netns(kubeconfig=agent_kubeconfig, api_port=proxy.port, llama_server=llama, workdir=workdir,
                               namespaces=(cluster.ns,), extra_args=agent_flags) as (ns, make_agent):
        mac = FaultyMac(cluster, ns, proxy, make_agent, workdir, llama, log_level=log_level)
        try:
            yield mac
        finally:
            for prober in mac.probers:
                await prober.stop()
            with contextlib.suppress(ToxiproxyError, aiohttp.ClientError):
                await proxy.clear()
            for agent in mac.agents:
                if agent.process and agent.process.running:
                    await agent.stop()
            for pid in mac.llama_servers():  # recorded or not (an orphan is what some faults make)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def fill_filesystem(directory: Path) -> None:
    """Fill the filesystem holding `directory` to the last byte: a `filler` file, then the
    room left in the last block of every file already there (appended lines of spaces), so
    that no log line fits anywhere."""
    def pad(path: Path, flags: int) -> None:
        fd = os.open(path, flags, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b" " * 4095 + b"\n")
        finally:
            os.close(fd)

    pad(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for path in directory.iterdir():
        if path.is_file() and path.name != "filler":
            pad(path, os.O_WRONLY | os.O_APPEND)
