"""metal-agent beside LLMKube's real controller: one writer per status field, no idle writes.

LLMKube's manager (built from the vendored, pinned source) runs out of
cluster with LLMKube's own CRDs; the agent runs as its least-privilege
identity inside a network namespace (a "Mac" with a routable address, so its
EndpointSlice is what LLMKube's controller reads). Everything asserted here is
what a user of both sees with kubectl: LLMKube's phase and conditions, our
`MetalProcessReady`/`MetalSpecAccepted`, Events, and who wrote what
(managedFields, the agent's status-write counter, a watch on the object).
"""

from __future__ import annotations

import pytest
import yaml
from kubernetes_asyncio import client

from tests.support import netns
from tests.support.agent import AgentProcess, agents_in_netns
from tests.support.coexistence import WRITES, Changes, agent_fields, chat, heartbeats_seen, llmkube_ready
from tests.support.fleet import slices
from tests.support.isvc import GROUP, VERSION, Cluster
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

@pytest.fixture
async def lk(llmkube_plane, llmkube_admin_api, llmkube_namespace, llama_server_bin, llmkube_tiny_model, tmp_path):
    """(cluster helper, netns, agent factory) on the plane where LLMKube's controller runs."""
    cluster = Cluster(llmkube_admin_api, llmkube_namespace)
    async with agents_in_netns(kubeconfig=llmkube_plane.agent_kubeconfig, api_port=llmkube_plane.control_plane.port,
                               llama_server=llama_server_bin, workdir=tmp_path, namespaces=(llmkube_namespace,),
                               extra_args=("--liveness-interval", "0.5", "--heartbeat-interval", "2")) as (ns, make_agent):
        yield cluster, ns, make_agent


def turboquant_sample(plane, model_path, *, keep_turbo3: bool = False) -> list[dict]:
    """LLMKube's own config/samples/inferenceservice_turboquant.yaml, pointed at the tiny
    GGUF under the manager's allowed host-path root; turbo3 (a TurboQuant fork's type)
    becomes q8_0 unless the test wants to see this build refuse it."""
    docs = [d for d in yaml.safe_load_all((plane.sample_dir / "inferenceservice_turboquant.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Model":
            doc["spec"]["source"] = f"file://{model_path}"
        elif not keep_turbo3:
            spec = doc["spec"]
            spec.pop("cacheTypeCustomK"), spec.pop("cacheTypeCustomV")
            spec["cacheTypeK"] = spec["cacheTypeV"] = "q8_0"
    return docs


async def apply_docs(cluster: Cluster, docs: list[dict]) -> str:
    for doc in docs:
        plural = "models" if doc["kind"] == "Model" else "inferenceservices"
        await cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.ns, plural, doc,
                                                             field_validation="Strict")
    return next(d["metadata"]["name"] for d in docs if d["kind"] == "InferenceService")


async def cond(cluster: Cluster, name: str, ctype: str) -> dict:
    return await cluster.condition(name, ctype) or {}


async def test_ready_under_llmkube_with_zero_idle_writes_and_the_go_agent_slice_gone(lk, llmkube_plane,
                                                                                      llmkube_tiny_model):
    cluster, ns, make_agent = lk
    docs = turboquant_sample(llmkube_plane, llmkube_tiny_model)
    name = next(d["metadata"]["name"] for d in docs if d["kind"] == "InferenceService")
    # What LLMKube's Go agent leaves behind after a switch: its slice, named after the Service, "ready".
    await client.DiscoveryV1Api(cluster.api).create_namespaced_endpoint_slice(cluster.ns, client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name=name, labels={
            "kubernetes.io/service-name": name, "app": name, "llmkube.ai/managed-by": "metal-agent",
            "llmkube.ai/inference-service": name}),
        address_type="IPv4", ports=[client.DiscoveryV1EndpointPort(name="http", port=1, protocol="TCP")],
        endpoints=[client.V1Endpoint(addresses=[ns.inner_ip], conditions=client.V1EndpointConditions(ready=True))]))

    agent = make_agent()
    await agent.start()
    await apply_docs(cluster, docs)
    status = await wait_for(lambda: llmkube_ready(cluster, name), timeout=90, what="Ready by LLMKube and by us")

    async def no_leftover():  # LLMKube keeps its "waiting for the agent" after Ready unless the agent clears it
        found = await cluster.status(name)
        return found if not found.get("schedulingStatus") else None
    status = await wait_for(no_leftover, timeout=10, what="no stale schedulingStatus once Ready")
    assert status["readyReplicas"] == 1 and status["endpoint"].endswith("/v1/chat/completions")
    assert [s.metadata.name for s in await slices(cluster, name)] == [f"{name}-metal"]  # the Go agent's is gone
    slice_ = (await slices(cluster, name))[0]
    assert await chat(slice_.endpoints[0].addresses[0], slice_.ports[0].port) == 200

    # Only our own fields carry our name.
    when, owned = agent_fields(await cluster.isvc(name))
    assert owned and owned <= {"f:conditions", "f:acceleration", "f:phase", "f:schedulingStatus",
                               "f:schedulingMessage", ".", "f:waitingFor"}
    assert "f:phase" not in owned and "f:endpoint" not in owned and "f:readyReplicas" not in owned

    # Idle, with a heartbeat every 2 s that LLMKube's controller answers with a write of its own.
    writes = await agent.metric(WRITES)
    async with Changes(cluster, name) as changes:
        heartbeat = slice_.metadata.annotations["llmkube.ai/agent-heartbeat"]
        await wait_for(lambda: heartbeats_seen(cluster, name, heartbeat, 5, every=2), timeout=60, what="5 heartbeats")
    assert await agent.metric(WRITES) == writes, "the agent wrote status while idle"
    assert agent_fields(await cluster.isvc(name))[0] == when
    assert set(changes.phases) <= {"Ready"}  # nothing flips while idle
    # LLMKube answers each heartbeat with one status update, two when its second reconcile
    # crosses a second of lastUpdated: ~6 heartbeats pass in this window.
    assert changes.count <= 2 * 6 + 1, f"{changes.count} changes in ~6 heartbeats: the writers do not settle"


async def test_spec_change_respawns_once_and_writers_converge(lk, llmkube_plane, llmkube_tiny_model):
    cluster, ns, make_agent = lk
    agent = make_agent()
    await agent.start()
    name = await apply_docs(cluster, turboquant_sample(llmkube_plane, llmkube_tiny_model))

    async def ready_no_leftover():
        status = await llmkube_ready(cluster, name)
        return status if status and not status.get("schedulingStatus") else None
    await wait_for(ready_no_leftover, timeout=90, what="Ready, no agent-absent leftover")
    old_pid = (await agent.services())[0]["pid"]
    writes = await _writes_once_settled(agent, cluster, name)

    async with Changes(cluster, name) as changes:
        await cluster.patch_isvc(name, {"contextSize": 4096})
        generation = (await cluster.isvc(name))["metadata"]["generation"]

        async def settled():
            status = await llmkube_ready(cluster, name)
            process = await cond(cluster, name, "MetalProcessReady")
            rows = await agent.services()
            return (status and not status.get("schedulingStatus") and process.get("observedGeneration") == generation
                    and rows and rows[0]["pid"] != old_pid)
        await wait_for(settled, timeout=90, what="respawned and Ready again, no agent-absent leftover")
        writes_at = await _writes_once_settled(agent, cluster, name)
        settled_at = changes.count
        # Once settled, the agent is quiet; what remains is LLMKube's answer to each heartbeat
        # (one status update, two when its second reconcile crosses a second of lastUpdated).
        first = (await slices(cluster, name))[0].metadata.annotations["llmkube.ai/agent-heartbeat"]
        await wait_for(lambda: heartbeats_seen(cluster, name, first, 3, every=2), timeout=60, what="3 heartbeats")
    applied = "\n".join(line for line in agent.log_text().splitlines() if "status applied" in line or "cleared LLMKube" in line)
    # Two writes of our own (loading, ready). If LLMKube's controller saw the respawn's not-ready
    # slice, it wrote "WaitingForMetalAgent", which it keeps after Ready: our ready write blanks
    # it. Only when that stands beside our Ready (LLMKube wrote it from a cache that had not seen
    # the ready slice, or our cache had not seen it yet; the machine's load decides) does
    # clearing it take one more write.
    clears = 1 if any(_leftover_beside_ready(s, generation) for s in changes.statuses) else 0
    assert writes_at - writes <= 2 + clears, f"a spec change costs at most two agent writes:\n{applied}"
    assert await agent.metric(WRITES) == writes_at, f"the agent wrote after settling:\n{applied}"
    assert changes.count - settled_at <= 2 * 4 + 1
    assert (await cluster.wait_event(name, "Respawning")).count("Respawning") == 1


async def _writes_once_settled(agent: AgentProcess, cluster: Cluster, name: str) -> float:
    """The agent's status-write count for what the server already shows. The agent counts a
    write when the answer is back, so a reader can see the write on the server a moment before
    the count: read it one heartbeat later (the agent's next act on the server), not at once."""
    first = (await slices(cluster, name))[0].metadata.annotations["llmkube.ai/agent-heartbeat"]
    await wait_for(lambda: heartbeats_seen(cluster, name, first, 1, every=2), timeout=30, what="a heartbeat")
    return await agent.metric(WRITES)


def _leftover_beside_ready(status: dict, generation: int) -> bool:
    process = next((c for c in status.get("conditions") or [] if c.get("type") == "MetalProcessReady"), {})
    return (status.get("schedulingStatus") == "WaitingForMetalAgent" and process.get("status") == "True"
            and process.get("observedGeneration") == generation)


async def test_turbo3_on_a_plain_build_reports_stderr_and_the_phase_holds(lk, llmkube_plane, llmkube_tiny_model):
    cluster, ns, make_agent = lk
    agent = make_agent()
    await agent.start()
    name = await apply_docs(cluster, turboquant_sample(llmkube_plane, llmkube_tiny_model, keep_turbo3=True))

    async def crash_loop():
        c = await cond(cluster, name, "MetalProcessReady")
        return c if c.get("reason") == "CrashLoopBackOff" else None
    process = await wait_for(crash_loop, timeout=60, what="MetalProcessReady/CrashLoopBackOff")
    assert "turbo3" in process["message"]  # llama-server's own line naming the unsupported type
    await cluster.wait_event(name, "ProcessExited")
    phase = (await cluster.status(name)).get("phase")
    async with Changes(cluster, name) as changes:
        await wait_for(lambda: _restarted_again(agent), timeout=30, what="another restart attempt")
    assert set(changes.phases) <= {phase}, f"phase flipped: {changes.phases}"


async def _restarted_again(agent: AgentProcess) -> bool:
    rows = await agent.services()
    return bool(rows) and rows[0]["restarts"] >= 2


async def test_agent_away_then_back_adopts_without_reload(lk, llmkube_plane, llmkube_tiny_model):
    """LLMKube calls a heartbeat older than 3 minutes stale; the test backdates the
    heartbeat instead of waiting 3 minutes, which is the same input to LLMKube."""
    cluster, ns, make_agent = lk
    agent = make_agent()
    await agent.start()
    name = await apply_docs(cluster, turboquant_sample(llmkube_plane, llmkube_tiny_model))
    await wait_for(lambda: llmkube_ready(cluster, name), timeout=90, what="Ready")
    pid = (await agent.services())[0]["pid"]
    await agent.stop()
    await client.DiscoveryV1Api(cluster.api).patch_namespaced_endpoint_slice(
        f"{name}-metal", cluster.ns, {"metadata": {"annotations": {"llmkube.ai/agent-heartbeat": "2026-01-01T00:00:00Z"}}},
        _content_type="application/merge-patch+json")

    async def stale():
        status = await cluster.status(name)
        return status if status.get("schedulingStatus") == "AgentHeartbeatStale" else None
    await wait_for(stale, timeout=30, what="LLMKube: AgentHeartbeatStale")

    await agent.start()
    await wait_for(lambda: llmkube_ready(cluster, name), timeout=60, what="Ready again")
    assert (await agent.services())[0]["pid"] == pid  # adopted: no reload

    async def stale_cleared():  # LLMKube keeps its own "stale" after Ready: the agent clears it
        return (await cluster.status(name)).get("schedulingStatus") != "AgentHeartbeatStale"
    await wait_for(stale_cleared, timeout=15, what="AgentHeartbeatStale cleared once Ready again")


async def test_scale_to_zero_suspend_and_delete(lk, llmkube_plane, llmkube_tiny_model):
    cluster, ns, make_agent = lk
    agent = make_agent()
    await agent.start()
    name = await apply_docs(cluster, turboquant_sample(llmkube_plane, llmkube_tiny_model))
    await wait_for(lambda: llmkube_ready(cluster, name), timeout=90, what="Ready")
    cluster_ip = (await cluster.core.read_namespaced_service(name, cluster.ns)).spec.cluster_ip

    for change, phase in (({"replicas": 0}, "Stopped"), ({"replicas": 1, "suspend": True}, "Suspended")):
        await cluster.patch_isvc(name, change)
        await cluster.wait_phase(name, phase)
        await wait_for(lambda: _no_slices(cluster, name), timeout=10, what=f"endpoints withdrawn ({phase})")
        assert await agent.services() == []
        assert (await cluster.core.read_namespaced_service(name, cluster.ns)).spec.cluster_ip == cluster_ip
    await cluster.patch_isvc(name, {"suspend": False})
    await wait_for(lambda: llmkube_ready(cluster, name), timeout=60, what="Ready after unsuspend")
    assert (await cluster.core.read_namespaced_service(name, cluster.ns)).spec.cluster_ip == cluster_ip

    await cluster.delete_isvc(name)

    async def gone():
        services = await cluster.core.list_namespaced_service(cluster.ns)
        return not services.items and await _no_slices(cluster, name) and await agent.services() == []
    await wait_for(gone, timeout=20, what="Service, slice and process gone")


async def _no_slices(cluster: Cluster, name: str) -> bool:
    return not await slices(cluster, name)


async def test_model_refused_by_llmkube_is_explained_on_the_service(lk, llmkube_plane, tiny_model):
    """A file:// source outside LLMKube's allowed roots: LLMKube refuses it (SourceNotAllowed) and the
    Mac does not serve it either; we say why, and how to fix it, where the user looks."""
    cluster, ns, make_agent = lk
    agent = make_agent()
    await agent.start()
    await cluster.create_model("outside", f"file://{tiny_model}")  # not under --allowed-host-path-roots

    async def refused_by_llmkube():
        model = await cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.ns, "models", "outside")
        return any(c.get("reason") == "SourceNotAllowed" for c in (model.get("status") or {}).get("conditions") or [])
    # LLMKube's word first: a process this agent had already started under its own policy would
    # rightly keep serving (README: an invalid change never kills a model the agent started), so
    # the service is applied once the refusal stands, which is what this test is about.
    await wait_for(refused_by_llmkube, timeout=60, what="LLMKube's SourceNotAllowed on the Model")
    await cluster.create_isvc("outside", "outside", contextSize=256)

    async def explained():
        c = await cond(cluster, "outside", "MetalSpecAccepted")
        return c if c.get("reason") == "SourceNotAllowed" else None
    accepted = await wait_for(explained, timeout=60, what="MetalSpecAccepted/SourceNotAllowed")
    assert "--allowed-host-path-roots" in accepted["message"] and "LLMKube" in accepted["message"]
    await cluster.wait_event("outside", "SourceNotAllowed")
    assert not [row for row in await agent.services() if row["service"].endswith("/outside")], \
        "a source LLMKube refused was served"
