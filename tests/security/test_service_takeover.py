"""An InferenceService named like someone else's Service never takes that Service over.

The real kube-apiserver, the real agent (least-privilege identity, in a network
namespace with a routable address) and a real llama-server. A stranger who may
create InferenceServices picks a name that another team's Service (and an
EndpointSlice) already has: the agent must leave both exactly as they were
(labels, owners, ports, resourceVersion), add no slice that feeds the Mac into
that Service, never delete them, and say why on the InferenceService
(`MetalSpecAccepted=False`, reason `ServiceNameConflict`, and an Event), while
the model keeps serving on the Mac. The guarded writes themselves
(`adapters/kube/owned.py`) are also driven through the races they exist for.
"""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters.kube.owned import NameTaken, OwnedObjects
from tests.support import netns
from tests.support.agent import agents_in_netns
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

FOREIGN_LABELS = {"app": "postgres", "team": "data"}


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                               llama_server=llama_server_bin, workdir=tmp_path, namespaces=(namespace,),
                               extra_args=("--heartbeat-interval", "1")) as (ns, make_agent):
        yield cluster, ns, make_agent


def foreign_service(name: str, **meta) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name, labels=dict(FOREIGN_LABELS), **meta),
        spec=client.V1ServiceSpec(selector={"app": "postgres"},
                                  ports=[client.V1ServicePort(name="pg", port=5432, target_port=5432)]))


def foreign_slice(name: str, service: str) -> client.V1EndpointSlice:
    return client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name=name, labels={**FOREIGN_LABELS, "kubernetes.io/service-name": service,
                                                        "endpointslice.kubernetes.io/managed-by": "team-data"}),
        address_type="IPv4", endpoints=[client.V1Endpoint(addresses=["10.9.9.9"])],
        ports=[client.CoreV1EndpointPort(name="pg", port=5432, protocol="TCP")])


def fingerprint(obj) -> tuple:
    """Everything a takeover would change, including who wrote what."""
    meta = obj.metadata
    ports = [(p.name, p.port) for p in (obj.spec.ports if hasattr(obj, "spec") and obj.spec else obj.ports) or []]
    return (meta.uid, meta.resource_version, meta.labels, meta.annotations,
            [r.uid for r in meta.owner_references or []], ports,
            sorted((f.manager, f.operation) for f in meta.managed_fields or []))


async def slices_for(cluster: Cluster, service: str) -> list:
    discovery = client.DiscoveryV1Api(cluster.api)
    return (await discovery.list_namespaced_endpoint_slice(
        cluster.ns, label_selector=f"kubernetes.io/service-name={service}")).items


async def conflict(cluster: Cluster, name: str) -> dict | None:
    cond = await cluster.condition(name, "MetalSpecAccepted")
    return cond if cond and cond["status"] == "False" and cond["reason"] == "ServiceNameConflict" else None


async def serving_locally(agent) -> dict | None:
    rows = [r for r in await agent.services() if r["state"] == "Ready"]
    return rows[0] if rows else None


async def test_a_foreign_service_and_slice_are_left_alone_and_the_conflict_is_reported(mac):
    cluster, ns, make_agent = mac
    discovery = client.DiscoveryV1Api(cluster.api)
    await cluster.core.create_namespaced_service(cluster.ns, foreign_service("db"))
    await discovery.create_namespaced_endpoint_slice(cluster.ns, foreign_slice("db-metal", "db"))
    svc_before = fingerprint(await cluster.core.read_namespaced_service("db", cluster.ns))
    slice_before = fingerprint(await discovery.read_namespaced_endpoint_slice("db-metal", cluster.ns))

    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("db", "tiny", contextSize=256)
    cond = await wait_for(lambda: conflict(cluster, "db"), timeout=90, what="ServiceNameConflict",
                          on_timeout=agent.log_text)
    assert f"Service {cluster.ns}/db already exists and is not metal-agent's" in cond["message"]
    await cluster.wait_event("db", "ServiceNameConflict", timeout=30)
    [event] = [e for e in await cluster.events("db") if e.reason == "ServiceNameConflict"]
    assert event.type == "Warning" and f"Service {cluster.ns}/db" in event.message
    # Only registration is refused: the model serves on the Mac.
    assert await wait_for(lambda: serving_locally(agent), timeout=60, what="llama-server ready on the Mac")

    # A few heartbeats and registration retries later: nothing of theirs changed, no slice of ours.
    await wait_for(lambda: _retried(agent, 3), timeout=60, what="three registration attempts")
    assert fingerprint(await cluster.core.read_namespaced_service("db", cluster.ns)) == svc_before
    assert fingerprint(await discovery.read_namespaced_endpoint_slice("db-metal", cluster.ns)) == slice_before
    assert [s.metadata.name for s in await slices_for(cluster, "db")] == ["db-metal"]
    assert (await discovery.list_namespaced_endpoint_slice(
        cluster.ns, label_selector="llmkube.ai/managed-by=metal-agent")).items == []
    assert (await cluster.status("db")).get("endpoint") in (None, "")
    assert "ServiceNameConflict" in [e.reason for e in await cluster.events("db")]
    assert len([e for e in await cluster.events("db") if e.reason == "ServiceNameConflict"]) == 1  # said once

    # Deleting the InferenceService stops the model and deletes nothing of theirs.
    await cluster.delete_isvc("db")
    await wait_for(lambda: _no_services(agent), timeout=60, what="llama-server stopped")
    await wait_for(lambda: _refusals(agent) >= {("Service", f"{cluster.ns}/db"), ("EndpointSlice", f"{cluster.ns}/db-metal")},
                   timeout=30, what="the refusals to delete, logged")
    assert fingerprint(await cluster.core.read_namespaced_service("db", cluster.ns)) == svc_before
    assert fingerprint(await discovery.read_namespaced_endpoint_slice("db-metal", cluster.ns)) == slice_before


async def test_once_the_foreign_service_is_gone_the_agent_registers(mac):
    cluster, ns, make_agent = mac
    await cluster.core.create_namespaced_service(cluster.ns, foreign_service("web"))
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("web", "tiny", contextSize=256)
    await wait_for(lambda: conflict(cluster, "web"), timeout=90, what="ServiceNameConflict", on_timeout=agent.log_text)
    assert await slices_for(cluster, "web") == []

    await cluster.core.delete_namespaced_service("web", cluster.ns)
    # The phase may say Ready all along (the process serves; only its registration was refused),
    # so the test waits for what it means to prove: our Service, retried within the back-off.
    svc = await wait_for(lambda: _our_service(cluster, "web"), timeout=90, what="the agent's Service",
                         on_timeout=agent.log_text)
    await cluster.wait_phase("web", "Ready", timeout=90)
    assert [(p.name, p.port) for p in svc.spec.ports] == [("http", 8080)]
    [ours] = await slices_for(cluster, "web")
    assert ours.metadata.name == "web-metal" and ours.endpoints[0].addresses == [ns.inner_ip]
    accepted = await cluster.condition("web", "MetalSpecAccepted")
    assert accepted["status"] == "True"


async def _our_service(cluster, name: str):
    try:
        svc = await cluster.core.read_namespaced_service(name, cluster.ns)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return svc if (svc.metadata.labels or {}).get("llmkube.ai/managed-by") == "metal-agent" else None


async def test_our_label_for_another_inference_service_is_not_ours(mac):
    """`q.b` and `q-b` derive the same Service name: the Service registered for `q-b` (our
    labels, its name) is not `q.b`'s to write over or delete."""
    cluster, ns, make_agent = mac
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("q-b", "tiny", contextSize=256)
    await cluster.wait_phase("q-b", "Ready", timeout=90)
    svc_before = fingerprint(await cluster.core.read_namespaced_service("q-b", cluster.ns))
    await cluster.create_isvc("q.b", "tiny", contextSize=256)
    cond = await wait_for(lambda: conflict(cluster, "q.b"), timeout=90, what="ServiceNameConflict",
                          on_timeout=agent.log_text)
    assert f"Service {cluster.ns}/q-b" in cond["message"]
    assert [s.metadata.labels["llmkube.ai/inference-service"] for s in await slices_for(cluster, "q-b")] == ["q-b"]
    await cluster.delete_isvc("q.b")
    await wait_for(lambda: _serving(agent, {"q-b"}), timeout=60, what="q.b's llama-server stopped")
    assert fingerprint(await cluster.core.read_namespaced_service("q-b", cluster.ns)) == svc_before
    [theirs] = await slices_for(cluster, "q-b")
    assert theirs.metadata.name == "q-b-metal" and theirs.endpoints[0].conditions.ready
    assert (await cluster.status("q-b"))["phase"] == "Ready"


async def test_a_foreign_slice_under_our_slice_name_is_left_alone(mac):
    cluster, ns, make_agent = mac
    discovery = client.DiscoveryV1Api(cluster.api)
    await discovery.create_namespaced_endpoint_slice(cluster.ns, foreign_slice("cache-metal", "elsewhere"))
    before = fingerprint(await discovery.read_namespaced_endpoint_slice("cache-metal", cluster.ns))
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("cache", "tiny", contextSize=256)
    cond = await wait_for(lambda: conflict(cluster, "cache"), timeout=90, what="ServiceNameConflict",
                          on_timeout=agent.log_text)
    assert f"EndpointSlice {cluster.ns}/cache-metal" in cond["message"]
    assert fingerprint(await discovery.read_namespaced_endpoint_slice("cache-metal", cluster.ns)) == before
    assert await slices_for(cluster, "cache") == []
    await cluster.delete_isvc("cache")
    await wait_for(lambda: _no_services(agent), timeout=60, what="llama-server stopped")
    assert fingerprint(await discovery.read_namespaced_endpoint_slice("cache-metal", cluster.ns)) == before


async def test_a_service_handed_to_the_inference_service_is_adopted(mac):
    """LLMKube's controller makes the Service itself while the Model is not on Metal, owned
    (controller reference) by the InferenceService: that one is this service's, and registers."""
    cluster, ns, make_agent = mac
    isvc = await cluster.create_isvc("handed", "tiny", contextSize=256)
    owner = client.V1OwnerReference(api_version="inference.llmkube.dev/v1alpha1", kind="InferenceService",
                                    name="handed", uid=isvc["metadata"]["uid"], controller=True)
    await cluster.core.create_namespaced_service(cluster.ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="handed", labels={"app": "handed", "inference.llmkube.dev/service": "handed"},
                                     owner_references=[owner]),
        spec=client.V1ServiceSpec(selector={"app": "handed"},
                                  ports=[client.V1ServicePort(name="http", port=8080, target_port=8080)])))
    agent = make_agent()
    await agent.start()
    await cluster.wait_phase("handed", "Ready", timeout=90)
    svc = await cluster.core.read_namespaced_service("handed", cluster.ns)
    assert svc.metadata.labels["llmkube.ai/managed-by"] == "metal-agent"
    assert [s.metadata.name for s in await slices_for(cluster, "handed")] == ["handed-metal"]


# -- the guarded writes themselves, through the races they exist for (agent identity) ----------

def _owned(core: client.CoreV1Api, listing=None) -> OwnedObjects:
    return OwnedObjects("Service", read=core.read_namespaced_service, listing=listing or core.list_namespaced_service,
                        patch=core.patch_namespaced_service, delete=core.delete_namespaced_service)


OURS = {"llmkube.ai/managed-by": "metal-agent", "llmkube.ai/inference-service": "race"}


def _ours(meta) -> bool:
    return (meta.labels or {}).get("llmkube.ai/managed-by") == "metal-agent"


def _body(ns: str, name: str = "race") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns, "labels": OURS},
            "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 4321, "protocol": "TCP"}]}}


async def test_a_service_created_between_the_look_and_the_write_is_not_taken(agent_api, admin_api, namespace):
    admin, core = client.CoreV1Api(admin_api), client.CoreV1Api(agent_api)

    async def look_then_someone_creates(ns, **kwargs):
        seen = await core.list_namespaced_service(ns, **kwargs)
        if not seen.items and not created:
            created.append(await admin.create_namespaced_service(ns, foreign_service("race")))
        return seen
    created: list = []
    with pytest.raises(NameTaken):
        await _owned(core, look_then_someone_creates).apply(namespace, "race", _body(namespace), _ours)
    assert fingerprint(await admin.read_namespaced_service("race", namespace)) == fingerprint(created[0])


async def test_a_service_replaced_after_our_write_is_not_written_over(agent_api, admin_api, namespace):
    admin, core = client.CoreV1Api(admin_api), client.CoreV1Api(agent_api)
    owned = _owned(core)
    await owned.apply(namespace, "swap", _body(namespace, "swap"), _ours)  # created: ours
    await owned.apply(namespace, "swap", _body(namespace, "swap"), _ours)  # applied over our own
    await admin.delete_namespaced_service("swap", namespace)
    await owned.apply(namespace, "swap", _body(namespace, "swap"), _ours)  # deleted: made again
    assert _ours((await admin.read_namespaced_service("swap", namespace)).metadata)
    await admin.delete_namespaced_service("swap", namespace)
    theirs = await admin.create_namespaced_service(namespace, foreign_service("swap"))
    with pytest.raises(NameTaken):
        await owned.apply(namespace, "swap", _body(namespace, "swap"), _ours)  # the heartbeat's apply
    assert fingerprint(await admin.read_namespaced_service("swap", namespace)) == fingerprint(theirs)


async def test_a_delete_spares_an_object_relabelled_after_the_check(agent_api, admin_api, namespace):
    admin, core = client.CoreV1Api(admin_api), client.CoreV1Api(agent_api)
    await client.CoreV1Api(admin_api).create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name="claimed", labels=OURS),
        spec=client.V1ServiceSpec(ports=[client.V1ServicePort(name="http", port=8080)])))

    async def read_then_someone_claims(name, ns):
        seen = await core.read_namespaced_service(name, ns)
        await admin.patch_namespaced_service(name, ns, {"metadata": {"labels": {"llmkube.ai/managed-by": "team-data"}}})
        return seen
    owned = _owned(core)
    owned._read = read_then_someone_claims
    assert not await owned.delete(namespace, "claimed", _ours)
    assert (await admin.read_namespaced_service("claimed", namespace)).metadata.labels["llmkube.ai/managed-by"] == "team-data"


async def _retried(agent, times: int) -> bool:
    return agent.log_text().count("not registering: the name is taken") >= times


async def _serving(agent, names: set[str]) -> bool:
    return {r["service"].split("/", 1)[1] for r in await agent.services()} == names


async def _no_services(agent) -> bool:
    return await agent.services() == []


def _refusals(agent) -> set[tuple[str, str]]:
    """(kind, namespace/name) of every delete the agent refused with a warning."""
    found = set()
    for line in agent.log_text().splitlines():
        try:
            entry = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if entry.get("event") == "not deleting an object we do not manage" and entry.get("level") == "warning":
            found.add((entry.get("kind"), entry.get("name")))
    return found
