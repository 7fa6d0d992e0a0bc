"""Registration end to end: the "Mac" is a network namespace with a real, reachable address.

The agent and its llama-servers run inside the namespace and register the
namespace's address; the test, in the root namespace, plays a cluster client:
it reads the EndpointSlice and talks to llama-server at the registered
address. The agent reaches the API server through a forwarder on the
namespace's loopback and authenticates as the least-privilege identity.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import sys

import aiohttp
import psutil
import pytest
from kubernetes_asyncio import client

from tests.support import netns
from tests.support.agent import AgentProcess, agents_in_netns
from tests.support.isvc import Cluster
from tests.support.procs import process_gone
from tests.support.slowness import scaled
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

MANAGED = "llmkube.ai/managed-by=metal-agent"


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    """(cluster helper, namespace handle, agent factory) with the agent inside a network namespace."""
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                               llama_server=llama_server_bin, workdir=tmp_path, namespaces=(namespace,),
                               # The engine's own registration (--no-front-door): the slice names the
                               # engine's address and port. The front door's (the default) is in
                               # test_front_door_agent.py.
                               extra_args=("--no-front-door", "--liveness-interval", "0.5", "--liveness-failures",
                                           "2", "--heartbeat-interval", "1")) as (ns, make_agent):
        yield cluster, ns, make_agent


async def read_slice(cluster: Cluster, name: str):
    discovery = client.DiscoveryV1Api(cluster.api)
    slices = await discovery.list_namespaced_endpoint_slice(cluster.ns, label_selector=f"kubernetes.io/service-name={name}")
    return slices.items[0] if slices.items else None


async def slice_ready(cluster: Cluster, name: str) -> bool | None:
    found = await read_slice(cluster, name)
    return found.endpoints[0].conditions.ready if found and found.endpoints else None


async def test_service_and_slice_follow_the_contract_and_serve(mac):
    cluster, ns, make_agent = mac
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("qwen.chat", "tiny", contextSize=256)
    status = await cluster.wait_phase("qwen.chat", "Ready")
    assert status["endpoint"] == f"http://qwen-chat.{cluster.ns}.svc.cluster.local:8080/v1/chat/completions"

    svc = await cluster.core.read_namespaced_service("qwen-chat", cluster.ns)
    pid = (await agent.services())[0]["pid"]
    port = (await agent.services())[0]["port"]
    assert svc.spec.selector is None
    assert [(p.name, p.port, p.target_port, p.protocol) for p in svc.spec.ports] == [("http", 8080, port, "TCP")]
    assert svc.metadata.labels == {"app": "qwen.chat", "llmkube.ai/managed-by": "metal-agent",
                                   "llmkube.ai/inference-service": "qwen.chat",
                                   # LLMKube's pod labels, which its PodMonitor (and ours) promote
                                   "inference.llmkube.dev/service": "qwen.chat",
                                   "inference.llmkube.dev/model": "tiny",
                                   "inference.llmkube.dev/runtime": "llamacpp"}
    assert svc.metadata.annotations["llmkube.ai/metal-accelerated"] == "true"
    assert svc.metadata.annotations["llmkube.ai/native-process"] == "true"

    found = await wait_for(lambda: _ready_slice(cluster, "qwen-chat"), timeout=10, what="ready slice")
    assert found.address_type == "IPv4"
    assert found.metadata.labels["kubernetes.io/service-name"] == "qwen-chat"
    assert found.metadata.labels["llmkube.ai/managed-by"] == "metal-agent"
    assert found.metadata.labels["app"] == "qwen.chat"
    assert found.metadata.annotations["llmkube.ai/agent-version"]
    dt.datetime.fromisoformat(found.metadata.annotations["llmkube.ai/agent-heartbeat"].replace("Z", "+00:00"))
    endpoint = found.endpoints[0]
    assert endpoint.addresses == [ns.inner_ip]
    assert [(p.name, p.port) for p in found.ports] == [("http", port)]

    # A cluster client: look up the slice, go to the registered address.
    address, target = endpoint.addresses[0], found.ports[0].port
    async with aiohttp.ClientSession() as http:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        async with http.post(f"http://{address}:{target}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"]

    # llama-server listens on the registered address only: inside the "Mac",
    # its own loopback gets a refusal on the same port.
    assert cmdline_value(pid, "--host") == ns.inner_ip
    probe = ("import socket,sys\n"
             "try:\n socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3); print('open')\n"
             "except ConnectionRefusedError:\n print('refused')\n")
    proc = await asyncio.create_subprocess_exec(*ns.wrap([sys.executable, "-c", probe, str(port)]),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out.decode().strip() == "refused"


async def test_endpoint_port_is_the_services_port_and_moves_without_a_respawn(mac):
    """`spec.endpoint.port` is what LLMKube's operator makes the Service port and writes into
    status.endpoint; the agent's Service follows it (targetPort stays the engine's), and a change
    moves the Service without touching the process (the port is not on its command line)."""
    cluster, _, make_agent = mac
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("ported", "tiny", contextSize=256, endpoint={"port": 9000, "path": "/v1/completions"})
    status = await cluster.wait_phase("ported", "Ready")
    assert status["endpoint"] == f"http://ported.{cluster.ns}.svc.cluster.local:9000/v1/completions"
    [row] = await agent.services()
    svc = await cluster.core.read_namespaced_service("ported", cluster.ns)
    assert [(p.port, p.target_port) for p in svc.spec.ports] == [(9000, row["port"])]

    await cluster.patch_isvc("ported", {"endpoint": {"port": 8081}})

    async def moved():
        svc = await cluster.core.read_namespaced_service("ported", cluster.ns)
        status = await cluster.status("ported")
        return svc.spec.ports[0].port == 8081 and status.get("endpoint", "").endswith(":8081/v1/completions")

    await wait_for(moved, timeout=20, what="Service and status.endpoint on port 8081")
    assert [(r["pid"], r["port"]) for r in await agent.services()] == [(row["pid"], row["port"])]


def cmdline_value(pid: int, flag: str) -> str:
    argv = psutil.Process(pid).cmdline()
    return argv[argv.index(flag) + 1]


async def _ready_slice(cluster: Cluster, name: str):
    found = await read_slice(cluster, name)
    return found if found and found.endpoints and found.endpoints[0].conditions.ready else None


async def test_cluster_ip_survives_respawn_and_ready_follows_the_process(mac):
    cluster, ns, make_agent = mac
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("steady", "tiny", contextSize=256)
    await cluster.wait_phase("steady", "Ready")
    cluster_ip = (await cluster.core.read_namespaced_service("steady", cluster.ns)).spec.cluster_ip
    assert cluster_ip

    old_pid = (await agent.services())[0]["pid"]
    await cluster.patch_isvc("steady", {"contextSize": 512})
    await wait_for(lambda: _ready_pid_other_than(agent, old_pid), timeout=30, what="respawn")
    await wait_for(lambda: _ready_slice(cluster, "steady"), timeout=10, what="slice ready after respawn")
    assert (await cluster.core.read_namespaced_service("steady", cluster.ns)).spec.cluster_ip == cluster_ip

    # kill -9: the slice says not ready within a second, then ready again after the restart.
    pid = (await agent.services())[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = asyncio.get_running_loop().time()
    await wait_for(lambda: _not_ready(cluster, "steady"), timeout=30, what="slice not ready", interval=0.02)
    assert asyncio.get_running_loop().time() - killed <= scaled(1.0)  # idle machine: tests/support/slowness.py
    await wait_for(lambda: _ready_slice(cluster, "steady"), timeout=30, what="slice ready after restart")
    assert (await cluster.core.read_namespaced_service("steady", cluster.ns)).spec.cluster_ip == cluster_ip

    # The heartbeat advances while the service runs.
    first = (await read_slice(cluster, "steady")).metadata.annotations["llmkube.ai/agent-heartbeat"]
    await wait_for(lambda: _heartbeat_after(cluster, "steady", first), timeout=10, what="heartbeat to advance")


async def _ready_pid_other_than(agent: AgentProcess, pid: int) -> int | None:
    rows = [r for r in await agent.services() if r["state"] == "Ready" and r["pid"] != pid]
    return rows[0]["pid"] if rows else None


async def _not_ready(cluster: Cluster, name: str) -> bool:
    return await slice_ready(cluster, name) is False


async def _heartbeat_after(cluster: Cluster, name: str, previous: str) -> bool:
    found = await read_slice(cluster, name)
    return found.metadata.annotations["llmkube.ai/agent-heartbeat"] > previous


async def test_cleanup_touches_only_what_we_manage(mac):
    cluster, ns, make_agent = mac
    core, discovery = cluster.core, client.DiscoveryV1Api(cluster.api)
    ours = {"llmkube.ai/managed-by": "metal-agent", "llmkube.ai/inference-service": "ghost", "app": "ghost"}
    await core.create_namespaced_endpoints(cluster.ns, client.V1Endpoints(metadata=client.V1ObjectMeta(name="legacy", labels=ours)))
    await core.create_namespaced_endpoints(cluster.ns, client.V1Endpoints(metadata=client.V1ObjectMeta(name="bystander")))
    port = [client.V1ServicePort(name="http", port=8080, target_port=9999)]
    await core.create_namespaced_service(cluster.ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="ghost", labels=ours), spec=client.V1ServiceSpec(ports=port)))
    await discovery.create_namespaced_endpoint_slice(cluster.ns, client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name="ghost-metal", labels={**ours, "kubernetes.io/service-name": "ghost"}),
        address_type="IPv4", endpoints=[client.V1Endpoint(addresses=[ns.inner_ip])]))
    await core.create_namespaced_service(cluster.ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="bystander"), spec=client.V1ServiceSpec(ports=port)))

    agent = make_agent()
    await agent.start()

    async def cleaned() -> bool:
        names = {s.metadata.name for s in (await core.list_namespaced_service(cluster.ns)).items}
        endpoints = {e.metadata.name for e in (await core.list_namespaced_endpoints(cluster.ns)).items}
        slices = {s.metadata.name for s in (await discovery.list_namespaced_endpoint_slice(cluster.ns)).items}
        return "ghost" not in names and "legacy" not in endpoints and "ghost-metal" not in slices
    await wait_for(cleaned, timeout=20, what="orphans and legacy Endpoints removed")
    assert "bystander" in {s.metadata.name for s in (await core.list_namespaced_service(cluster.ns)).items}
    assert "bystander" in {e.metadata.name for e in (await core.list_namespaced_endpoints(cluster.ns)).items}

    # Deleting a served InferenceService removes its registration.
    await cluster.create_isvc("brief", "tiny", contextSize=256)
    await cluster.wait_phase("brief", "Ready")
    await cluster.delete_isvc("brief")

    async def unregistered() -> bool:
        names = {s.metadata.name for s in (await core.list_namespaced_service(cluster.ns, label_selector=MANAGED)).items}
        return "brief" not in names and await read_slice(cluster, "brief") is None
    await wait_for(unregistered, timeout=10, what="registration removed with the InferenceService")


async def test_api_outage_mid_respawn_converges_without_extra_restarts(mac, control_plane):
    cluster, ns, make_agent = mac
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("outage", "tiny", contextSize=256)
    await cluster.wait_phase("outage", "Ready")
    old = (await agent.services())[0]

    await cluster.patch_isvc("outage", {"contextSize": 512})
    await wait_for(lambda: process_gone(old["pid"]), timeout=20, what="respawn to begin", interval=0.01)
    await control_plane.stop_apiserver()
    try:
        new_pid = await wait_for(lambda: _ready_pid_other_than(agent, old["pid"]), timeout=30, what="respawned during outage")
        await asyncio.sleep(20)  # the outage under test lasts 20 s; every check after it waits on state
    finally:
        await control_plane.start_apiserver()

    async def converged():
        found = await _ready_slice(cluster, "outage")
        status = await cluster.status("outage")
        row = (await agent.services())[0]
        return found and status.get("phase") == "Ready" and found.ports[0].port == row["port"]
    await wait_for(converged, timeout=60, what="slice and status to converge")
    assert (await agent.services())[0]["pid"] == new_pid
    labels = {"name": "outage", "namespace": cluster.ns}
    assert await agent.metric("llmkube_metal_agent_respawns_total", labels) == 1
    assert await agent.metric("llmkube_metal_agent_process_restarts_total", labels) in (None, 0)


async def _slice_names(cluster: Cluster, service: str) -> set[str]:
    slices = await client.DiscoveryV1Api(cluster.api).list_namespaced_endpoint_slice(
        cluster.ns, label_selector=f"kubernetes.io/service-name={service}")
    return {s.metadata.name for s in slices.items}


async def test_go_agent_slice_is_replaced_and_scale_to_zero_keeps_the_cluster_ip(mac):
    """A switch from LLMKube's Go agent leaves its slice (named after the Service, ready, on a
    dead port): LLMKube would count two replicas and kube-proxy would send traffic there.
    Scaling to zero or suspending withdraws only the endpoints: the Service, and the
    ClusterIP clients hold, stay."""
    cluster, ns, make_agent = mac
    labels = {"kubernetes.io/service-name": "keep", "app": "keep", "llmkube.ai/managed-by": "metal-agent",
              "llmkube.ai/inference-service": "keep"}
    await client.DiscoveryV1Api(cluster.api).create_namespaced_endpoint_slice(cluster.ns, client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name="keep", labels=labels,
                                     annotations={"llmkube.ai/agent-heartbeat": "2026-01-01T00:00:00Z"}),
        address_type="IPv4", ports=[client.DiscoveryV1EndpointPort(name="http", port=1, protocol="TCP")],
        endpoints=[client.V1Endpoint(addresses=[ns.inner_ip], conditions=client.V1EndpointConditions(ready=True))]))
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("keep", "tiny", contextSize=256)
    await cluster.wait_phase("keep", "Ready")
    await wait_for(lambda: _only_ours(cluster), timeout=10,
                   what="the Go agent's slice removed, ours in place")
    cluster_ip = (await cluster.core.read_namespaced_service("keep", cluster.ns)).spec.cluster_ip

    for change, phase in (({"replicas": 0}, "Stopped"), ({"replicas": 1, "suspend": True}, "Suspended")):
        await cluster.patch_isvc("keep", change)
        await cluster.wait_phase("keep", phase)
        await wait_for(lambda: _no_slices(cluster), timeout=10, what=f"endpoints withdrawn ({phase})")
        assert (await cluster.core.read_namespaced_service("keep", cluster.ns)).spec.cluster_ip == cluster_ip

    await cluster.patch_isvc("keep", {"suspend": False})
    await cluster.wait_phase("keep", "Ready")
    await wait_for(lambda: _ready_slice(cluster, "keep"), timeout=10, what="endpoints back")
    assert (await cluster.core.read_namespaced_service("keep", cluster.ns)).spec.cluster_ip == cluster_ip


async def _only_ours(cluster: Cluster) -> bool:
    return await _slice_names(cluster, "keep") == {"keep-metal"}


async def _no_slices(cluster: Cluster) -> bool:
    return await _slice_names(cluster, "keep") == set()


async def test_a_deleted_or_edited_slice_is_repaired(mac):
    """What is in the cluster is observed state: a slice someone deleted comes back, and
    one someone edited (say, pointed at another port) is put right, by the next heartbeat."""
    cluster, ns, make_agent = mac
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("mended", "tiny", contextSize=256)
    await cluster.wait_phase("mended", "Ready")
    port = (await agent.services())[0]["port"]
    discovery = client.DiscoveryV1Api(cluster.api)

    await discovery.delete_namespaced_endpoint_slice("mended-metal", cluster.ns)
    await wait_for(lambda: _ready_slice(cluster, "mended"), timeout=10, what="deleted slice re-created")

    await discovery.patch_namespaced_endpoint_slice(
        "mended-metal", cluster.ns, {"ports": [{"name": "http", "port": 1, "protocol": "TCP"}]},
        _content_type="application/merge-patch+json")

    async def repaired():
        found = await _ready_slice(cluster, "mended")
        return found and found.ports[0].port == port
    await wait_for(repaired, timeout=10, what="edited slice repaired")


async def test_a_moved_address_is_followed(mac):
    """The Mac changes networks (DHCP, another Wi-Fi, Tailscale up after login): the
    EndpointSlice follows the new address, and llama-server, which listened on the old one
    only, is respawned on the new one, with an Event saying why."""
    cluster, ns, make_agent = mac
    agent = make_agent("--address-check-interval", "0.3", detect_host=True)
    await agent.start()
    await cluster.create_isvc("roam", "tiny", contextSize=256)
    await cluster.wait_phase("roam", "Ready")

    moved = await netns.move_address(ns)  # the agent's own HTTP API was on the old address too

    async def registered_there():
        found = await _ready_slice(cluster, "roam")
        return found if found and found.endpoints[0].addresses == [moved.inner_ip] else None
    found = await wait_for(registered_there, timeout=30, what="slice on the new address, ready")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{moved.inner_ip}:{found.ports[0].port}/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200
    assert "HostAddressChanged" in await cluster.wait_event("roam", "HostAddressChanged")

    # The agent's own metrics endpoint moves with it: its slice names the new address, where
    # it now listens (a scrape without a token is refused there, not unanswered).
    async def agent_slice_moved():
        slices = await client.DiscoveryV1Api(cluster.api).list_namespaced_endpoint_slice(
            "metal-agent", label_selector="kubernetes.io/service-name=metal-agent")
        return any(e.addresses == [moved.inner_ip] for s in slices.items for e in s.endpoints or [])
    await wait_for(agent_slice_moved, timeout=30, what="the agent's metrics slice on the new address")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{moved.inner_ip}:{agent.port}/metrics") as resp:
            assert resp.status == 401
