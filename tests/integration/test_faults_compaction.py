"""etcd compaction while the agent is cut off: every watch resumes into 410 Gone.

The API server here runs without its watch cache (`--watch-cache=false`), so
watches are served by etcd itself and a resourceVersion older than etcd's
compacted revision is refused with 410, as it is for any client of a cluster
whose watch cache was reset. The agent reaches the API server through
Toxiproxy; its connections are reset while the spec changes and etcd is
compacted, so when they come back every watch resumes from a revision that is
gone. The agent must relist (no exit, no needless restart), apply the change
it missed, and keep its slices true throughout.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support import netns
from tests.support.controlplane import ControlPlane
from tests.support.isvc import GROUP, MERGE_PATCH, VERSION, Cluster
from tests.support.kube import api_client, create_namespace, install_metal_agent
from tests.support.slowness import scaled
from tests.support.toxiproxy import faulty_mac, kubeconfig_via
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

# --no-front-door: as in test_faults.py, the slice probers measure how long a slice names a dead
# engine port, which behind the front door (the default) cannot happen.
AGENT_FLAGS = ("--no-front-door", "--liveness-interval", "0.5", "--liveness-failures", "2", "--heartbeat-interval", "1")


def dead_ready_limit() -> float:
    """Seconds a slice may say ready for an endpoint that does not answer: 1 on an idle machine."""
    return scaled(1.0)


@pytest.fixture
async def uncached_plane(controlplane_binaries, tmp_path):
    cp = ControlPlane(controlplane_binaries, tmp_path / "cp", apiserver_args=("--watch-cache=false",))
    await cp.start()
    admin = await api_client(cp.admin_kubeconfig)
    try:
        await install_metal_agent(admin)
        yield cp, admin
    finally:
        await admin.close()
        await cp.stop()


async def relists(agent, resource: str) -> float:
    return await agent.metric("llmkube_metal_agent_watch_relists_total", {"resource": resource, "reason": "expired"}) or 0


async def test_etcd_compaction_during_a_cut_makes_every_watch_relist(uncached_plane, toxiproxy, llama_server_bin,
                                                                       tiny_model, tmp_path):
    cp, admin = uncached_plane
    cluster = Cluster(admin, await create_namespace(admin, "compaction"))
    await cluster.create_model("tiny", f"file://{tiny_model}")
    proxy = await toxiproxy.create_proxy(f"127.0.0.1:{cp.port}")
    kubeconfig = kubeconfig_via(cp.agent_kubeconfig, tmp_path / "agent.kubeconfig", proxy.port)
    (tmp_path / "mac").mkdir()
    try:
        async with faulty_mac(cluster, proxy, kubeconfig, tmp_path / "mac", llama_server_bin,
                              agent_flags=AGENT_FLAGS) as mac:
            agent, pids = await mac.serve("changed", "steady")
            before = {r: await relists(agent, r) for r in ("inferenceservices", "models")}
            async with mac.probe(["changed", "steady"]) as probe:
                async with proxy.fault("reset_peer"):
                    await wait_for(lambda: _unreachable(agent), timeout=30, what="the agent to lose the API server")
                    await probe.wait_sampled(since=time.monotonic())  # looked while the agent is cut off
                    await cluster.patch_isvc("changed", {"contextSize": 512})  # missed by the cut watch
                    await cluster.custom.patch_namespaced_custom_object(  # a Model event missed too
                        GROUP, VERSION, cluster.ns, "models", "tiny",
                        {"metadata": {"annotations": {"faults.test/touched": str(time.time())}}}, _content_type=MERGE_PATCH)
                    compacted = await cp.compact_etcd()
                ended = time.time()
                await wait_for(lambda: mac.ready_pid(agent, "changed", other_than=pids["changed"]), timeout=60,
                               what="the missed spec change applied after the relist", on_timeout=agent.process.tail)
                await mac.wait_converged(agent, ["changed", "steady"], since=ended)
                await probe.wait_sampled(since=time.monotonic())  # and after the relist
            assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
            for resource in ("inferenceservices", "models"):
                assert await relists(agent, resource) > before[resource], (resource, compacted)
            assert (await mac.pids(agent))["steady"] == pids["steady"]
            assert await mac.restarts(agent, "steady") == 0 and await mac.restarts(agent, "changed") == 0
            assert agent.process.running
            expired = [json.loads(line) for line in agent.log_text().splitlines()
                       if "resourceVersion expired; relisting" in line]
            assert {e["resource"] for e in expired} == {"inferenceservices", "models"}
    finally:
        await proxy.delete()


async def _unreachable(agent) -> bool:
    status, text = await agent._get("/readyz")
    return status == 503 and "unreachable" in text
