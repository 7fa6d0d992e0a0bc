"""Registrar on its own: Registrations in, Service and EndpointSlice out, written to the real
kube-apiserver as the agent identity (RBAC on). No agent, no llama-server: the address and
port are what a process would have; nothing connects to them.

What it promises (metal_agent/adapters/kube/registrar.py, owned.py): a Service and slice
with the wire contract's labels and ports, one write per change; a heartbeat that re-applies
the whole slice (so a user's edit of ours is repaired and a deleted slice comes back);
withdraw deletes the slice only, remove the Service too, and neither deletes what is not
ours; a foreign Service of the name raises NameTaken and is left exactly as it was.
The end-to-end takeover test (tests/security/test_service_takeover.py) runs the whole
agent in a network namespace; this one needs neither root nor namespaces.
"""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters.kube.registrar import NameTaken, Registrar
from metal_agent.core.registration import (
    HEARTBEAT_ANNOTATION,
    HOST_LABEL,
    ISVC_LABEL,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    VERSION_ANNOTATION,
    Registration,
)
from tests.support.isvc import Cluster

pytestmark = pytest.mark.integration

ADDRESS, PORT = "10.20.30.40", 8123
OLD_BEAT = "2000-01-01T00:00:00Z"


@pytest.fixture
async def setup(agent_api, admin_api, namespace):
    """(registrar as the agent, admin CoreV1Api, admin DiscoveryV1Api, Cluster)."""
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", "file:///models/tiny.gguf")
    return (Registrar(agent_api, agent_version="9.9.9-test", host="Test Mac"), client.CoreV1Api(admin_api),
            client.DiscoveryV1Api(admin_api), cluster)


async def registration(cluster: Cluster, name: str, *, ready: bool = True) -> Registration:
    isvc = await cluster.create_isvc(name, "tiny")
    return Registration(namespace=cluster.ns, isvc_name=name, isvc_uid=isvc["metadata"]["uid"], address=ADDRESS,
                        port=PORT, ready=ready, model="tiny")


async def absent(read, name: str, namespace: str) -> bool:
    try:
        await read(name, namespace)
    except ApiException as err:
        return err.status == 404
    return False


async def test_ensure_writes_the_contract_once_and_the_heartbeat_repairs_an_edited_or_deleted_slice(setup):
    registrar, core, discovery, cluster = setup
    reg = await registration(cluster, "chat")
    assert await registrar.ensure(reg) is True
    assert registrar.registered(f"{cluster.ns}/chat")

    svc = await core.read_namespaced_service("chat", cluster.ns)
    assert svc.metadata.labels[MANAGED_BY_LABEL] == "metal-agent" and svc.metadata.labels[ISVC_LABEL] == "chat"
    assert svc.spec.selector is None and svc.spec.cluster_ip
    [port] = svc.spec.ports
    assert (port.name, port.port, port.target_port) == ("http", 8080, PORT)
    assert [ref.uid for ref in svc.metadata.owner_references] == [reg.isvc_uid]

    sl = await discovery.read_namespaced_endpoint_slice("chat-metal", cluster.ns)
    assert sl.metadata.labels[SERVICE_NAME_LABEL] == "chat" and sl.metadata.labels[HOST_LABEL] == "Test-Mac"
    assert sl.metadata.annotations[VERSION_ANNOTATION] == "9.9.9-test" and sl.metadata.annotations[HEARTBEAT_ANNOTATION]
    assert sl.address_type == "IPv4"
    [endpoint] = sl.endpoints
    assert endpoint.addresses == [ADDRESS] and endpoint.conditions.ready is True
    assert [(p.name, p.port) for p in sl.ports] == [("http", PORT)]

    # The same registration again: nothing written.
    assert await registrar.ensure(reg) is False
    assert (await discovery.read_namespaced_endpoint_slice("chat-metal", cluster.ns)).metadata.resource_version \
        == sl.metadata.resource_version

    # Someone edits our slice (another field manager): not ready, another address, an old heartbeat.
    await discovery.patch_namespaced_endpoint_slice("chat-metal", cluster.ns, {
        "metadata": {"annotations": {HEARTBEAT_ANNOTATION: OLD_BEAT}},
        "endpoints": [{"addresses": ["10.99.99.99"], "conditions": {"ready": False}}]})
    assert await registrar.heartbeat() == (1, 0)
    repaired = await discovery.read_namespaced_endpoint_slice("chat-metal", cluster.ns)
    assert [e.addresses for e in repaired.endpoints] == [[ADDRESS]] and repaired.endpoints[0].conditions.ready is True
    assert repaired.metadata.annotations[HEARTBEAT_ANNOTATION] != OLD_BEAT

    # Someone deletes it: the next heartbeat brings it back, and the Service kept its ClusterIP.
    await discovery.delete_namespaced_endpoint_slice("chat-metal", cluster.ns)
    assert await registrar.heartbeat() == (1, 0)
    back = await discovery.read_namespaced_endpoint_slice("chat-metal", cluster.ns)
    assert back.metadata.uid != sl.metadata.uid and back.endpoints[0].addresses == [ADDRESS]
    assert (await core.read_namespaced_service("chat", cluster.ns)).spec.cluster_ip == svc.spec.cluster_ip

    await registrar.mark_not_ready(cluster.ns, "chat")  # before the process behind it stops
    assert (await discovery.read_namespaced_endpoint_slice("chat-metal", cluster.ns)).endpoints[0].conditions.ready \
        is False


async def test_withdraw_and_remove_delete_ours_and_nothing_else(setup):
    registrar, core, discovery, cluster = setup
    await registrar.ensure(await registration(cluster, "chat"))
    await registrar.ensure(await registration(cluster, "other"))

    await registrar.withdraw(cluster.ns, "other")  # nothing serves: the slice goes, the Service stays
    assert await absent(discovery.read_namespaced_endpoint_slice, "other-metal", cluster.ns)
    assert (await core.read_namespaced_service("other", cluster.ns)).metadata.labels[ISVC_LABEL] == "other"
    assert not registrar.registered(f"{cluster.ns}/other")

    # Someone replaced our slice of "chat" by their own of the same name (no managed-by label).
    await discovery.delete_namespaced_endpoint_slice("chat-metal", cluster.ns)
    await discovery.create_namespaced_endpoint_slice(cluster.ns, client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name="chat-metal", labels={SERVICE_NAME_LABEL: "chat", "team": "data"}),
        address_type="IPv4", endpoints=[client.V1Endpoint(addresses=["10.9.9.9"])],
        ports=[client.CoreV1EndpointPort(name="http", port=9000, protocol="TCP")]))
    theirs = await discovery.read_namespaced_endpoint_slice("chat-metal", cluster.ns)

    await registrar.remove(cluster.ns, "chat")  # the InferenceService is gone
    assert await absent(core.read_namespaced_service, "chat", cluster.ns)
    after = await discovery.read_namespaced_endpoint_slice("chat-metal", cluster.ns)
    assert (after.metadata.uid, after.metadata.resource_version) == (theirs.metadata.uid, theirs.metadata.resource_version)

    # The other service's Service was never touched by chat's removal.
    assert (await core.read_namespaced_service("other", cluster.ns)).metadata.labels[ISVC_LABEL] == "other"


async def test_a_foreign_service_of_the_name_raises_name_taken_and_is_untouched(setup):
    registrar, core, discovery, cluster = setup
    await core.create_namespaced_service(cluster.ns, client.V1Service(
        metadata=client.V1ObjectMeta(name="db", labels={"app": "postgres", "team": "data"}),
        spec=client.V1ServiceSpec(selector={"app": "postgres"},
                                  ports=[client.V1ServicePort(name="pg", port=5432, target_port=5432)])))
    before = await core.read_namespaced_service("db", cluster.ns)

    reg = await registration(cluster, "db")
    with pytest.raises(NameTaken) as taken:
        await registrar.ensure(reg)
    assert (taken.value.kind, taken.value.name) == ("Service", "db")
    assert not registrar.registered(f"{cluster.ns}/db")
    with pytest.raises(NameTaken):  # and again on the next reconcile: no memory of a half-success
        await registrar.ensure(reg)

    await registrar.remove(cluster.ns, "db")  # the InferenceService is deleted: still nothing of theirs goes
    after = await core.read_namespaced_service("db", cluster.ns)
    assert (after.metadata.uid, after.metadata.resource_version, after.metadata.labels, after.spec.selector) == \
        (before.metadata.uid, before.metadata.resource_version, before.metadata.labels, before.spec.selector)
    assert sorted((f.manager, f.operation) for f in after.metadata.managed_fields) == \
        sorted((f.manager, f.operation) for f in before.metadata.managed_fields)
    # No slice of ours sends that Service's traffic to the Mac.
    assert (await discovery.list_namespaced_endpoint_slice(cluster.ns, label_selector=f"{SERVICE_NAME_LABEL}=db")).items == []
