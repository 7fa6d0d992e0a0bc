"""Fleets of "Macs" for tests, and watching a service's EndpointSlices the way a cluster
client sees them (tests/integration/test_fleet*.py and bench/fleet.py).

Each "Mac" is a network namespace with its own routable address, its own
state, model and log directories, and an agent that reaches the real
kube-apiserver as the least-privilege identity. Leases are short (6 s,
renewed every second) so failover happens within a test's patience; the
rules are the same at the default 40 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time

import aiohttp
from kubernetes_asyncio import client

from metal_agent.core.leases import member_lease_name
from tests.support.agent import AgentProcess, agents_in_netns
from tests.support.isvc import Cluster
from tests.support.kube import api_client_for
from tests.support.netns import NetNS

LEASE_S = 6.0
FLEET_FLAGS = ("--fleet", "--lease-duration", str(LEASE_S), "--lease-renew-interval", "1", "--fleet-bid-step", "1",
               "--heartbeat-interval", "1", "--liveness-interval", "0.5", "--liveness-failures", "2")
FLEET_NAMESPACE = "metal-agent"  # the agents' default --fleet-namespace
START_TIMEOUT = 90  # a deadline for a condition on a shared 2-core machine, not a goal


class Mac:
    def __init__(self, name: str, ns: NetNS, agent: AgentProcess, workdir) -> None:
        self.name, self.ns, self.agent, self.workdir = name, ns, agent, workdir

    async def fleet(self) -> dict:
        status, text = await self.agent._get("/v1/fleet")
        assert status == 200, text
        return json.loads(text)

    async def holds(self) -> list[str]:
        view = await self.fleet()
        return next(m["holds"] for m in view["members"] if m["member"] == self.name)


@contextlib.asynccontextmanager
async def fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs, *, api_ports=None, extra=()):
    """Macs named after `specs` ({suffix: labels}) on `control_plane` (anything with `port`,
    `agent_kubeconfig` and `admin_kubeconfig`); names are unique per test (the fleet namespace is
    shared). A stopped agent keeps its member Lease on purpose (a restart must find it), so the
    Macs' Leases are deleted afterwards: otherwise a later test's fleet counts them as alive
    members for one lease duration."""
    tag = secrets.token_hex(2)
    macs: list[Mac] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(_forget_members, control_plane, macs)
        for suffix, labels in specs.items():
            name = f"{suffix}-{tag}"
            workdir = tmp_path / name
            workdir.mkdir()
            port = (api_ports or {}).get(suffix, control_plane.port)
            kubeconfig = (api_ports or {}).get(suffix + ":kubeconfig", control_plane.agent_kubeconfig)
            ns, make_agent = await stack.enter_async_context(agents_in_netns(
                kubeconfig=kubeconfig, api_port=port, llama_server=llama_server_bin, workdir=workdir,
                namespaces=(namespace,), extra_args=(*FLEET_FLAGS, "--member-name", name,
                                                     *(a for k, v in labels.items() for a in ("--label", f"{k}={v}")),
                                                     *extra)))
            macs.append(Mac(name, ns, make_agent(), workdir))
        yield macs


async def _forget_members(control_plane, macs: list[Mac]) -> None:
    """Delete the member Leases of `macs` (runs after their agents stopped)."""
    async with api_client_for(control_plane.admin_kubeconfig) as api:
        leases = client.CoordinationV1Api(api)
        for mac in macs:
            with contextlib.suppress(client.exceptions.ApiException):
                await leases.delete_namespaced_lease(member_lease_name(mac.name), FLEET_NAMESPACE)


async def ready_on(cluster: Cluster, service: str, macs: list[Mac], count: int = 1) -> list[Mac] | None:
    """The Macs whose slice for `service` is ready, once there are `count` of them."""
    addresses = {a for a, _ in await ready_endpoints(cluster, service)}
    on = [m for m in macs if m.ns.inner_ip in addresses]
    return on if len(on) == count and len(addresses) == count else None


async def cli_in(mac: Mac, *argv: str) -> tuple[int, str]:
    """Run `metal-agent <argv>` on the Mac (inside its namespace), as its user would."""
    proc = await asyncio.create_subprocess_exec(
        *mac.ns.wrap([sys.executable, "-m", "metal_agent", *argv, "--listen", f"{mac.agent.listen_host}:{mac.agent.port}"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=START_TIMEOUT + 30)
    return proc.returncode, out.decode(errors="replace")


async def answers(address: str, port: int) -> bool:
    """A chat completion from the llama-server at `address:port`."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{address}:{port}/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return resp.status == 200 and bool((await resp.json())["choices"])


async def slices(cluster: Cluster, service: str) -> list:
    listing = await client.DiscoveryV1Api(cluster.api).list_namespaced_endpoint_slice(
        cluster.ns, label_selector=f"kubernetes.io/service-name={service}")
    return listing.items


async def ready_endpoints(cluster: Cluster, service: str) -> list[tuple[str, int]]:
    """(address, port) of every endpoint of the service whose slice says ready."""
    return [(e.addresses[0], s.ports[0].port) for s in await slices(cluster, service)
            for e in s.endpoints or [] if e.conditions and e.conditions.ready]


class ReadyWatcher:
    """Samples the service's ready endpoints every `interval`: the most it ever saw, the time
    spent with more ready endpoints than `limit` and with none, and when each address was
    last seen ready (a sample's duration is the time since the previous sample)."""

    def __init__(self, cluster: Cluster, service: str, *, limit: int | None = None, interval: float = 0.05) -> None:
        self.cluster, self.service, self.limit, self.interval = cluster, service, limit, interval
        self.most = 0
        self.last_ready: dict[str, float] = {}
        self.first_ready: dict[str, float] = {}
        self.zero_since: float | None = None
        self.zero_s = 0.0
        self.over_s = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        previous = time.monotonic()
        while True:
            ready = await ready_endpoints(self.cluster, self.service)
            now = time.monotonic()
            self.most = max(self.most, len(ready))
            if self.limit is not None and len(ready) > self.limit:
                self.over_s += now - previous
            for address, _ in ready:
                self.last_ready[address] = now
                self.first_ready.setdefault(address, now)
            if not ready:
                self.zero_since = self.zero_since or now
            elif self.zero_since is not None:
                self.zero_s += now - self.zero_since
                self.zero_since = None
            previous = now
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> "ReadyWatcher":
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
