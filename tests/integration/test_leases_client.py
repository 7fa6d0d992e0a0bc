"""LeaseClient on its own, against the real kube-apiserver as the agent identity (RBAC on:
the fleet Role grants Leases in `metal-agent` only).

What the fleet rests on (metal_agent/adapters/kube/leases.py): a write that decides who
serves a replica is conditional on the resourceVersion it was decided on, so of two
writers at the same version exactly one wins and the other gets None (409 is an answer);
a member's own renewal (`put`) survives someone else's write by re-reading once; a
delete at a stale version deletes nothing. The Lease bodies are the real ones
(core.leases). Names carry the test's namespace or a random tag: the fleet namespace is
shared by every test of the session.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters.kube.leases import GROUP, PLURAL, VERSION, LeaseClient
from metal_agent.core.leases import REPLICA_LABEL, ROLE_LABEL, MemberInfo, member_lease, parse_replica, replica_lease
from metal_agent.core.placement import Member

pytestmark = pytest.mark.integration

FLEET_NS = "metal-agent"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def replica(key: str, holder: str | None, rv: str | None = None, index: int = 0) -> dict:
    return replica_lease(key, index, holder=holder, duration_s=40, now=now(), resource_version=rv)


@pytest.fixture
async def leases(agent_api, admin_api, namespace):
    """(agent's LeaseClient, admin's LeaseClient); every Lease of this test's replicas is removed after."""
    agent, admin = LeaseClient(agent_api, FLEET_NS), LeaseClient(admin_api, FLEET_NS)
    yield agent, admin
    await admin.api.delete_collection_namespaced_custom_object(
        GROUP, VERSION, FLEET_NS, PLURAL, label_selector=f"llmkube.ai/inference-service-namespace={namespace}")


async def read(admin: LeaseClient, name: str) -> dict:
    return await admin.api.get_namespaced_custom_object(GROUP, VERSION, FLEET_NS, PLURAL, name)


async def test_a_free_replica_is_won_by_exactly_one_of_two_bidders(leases, namespace):
    agent, admin = leases
    key = f"{namespace}/chat"
    first = await agent.swap(replica(key, "a"))  # create: nobody made it yet
    assert first is not None and parse_replica(first).holder == "a"
    assert await agent.swap(replica(key, "b")) is None  # a second create of the same Lease loses
    assert parse_replica(await read(admin, first["metadata"]["name"])).holder == "a"

    # Both saw the Lease at the same version and bid for it at once (as after a's death).
    seen = first["metadata"]["resourceVersion"]
    results = await asyncio.gather(agent.swap(replica(key, "b", seen)), agent.swap(replica(key, "c", seen)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    stored = parse_replica(await read(admin, first["metadata"]["name"]))
    assert stored.holder == parse_replica(winners[0]).holder
    assert stored.resource_version == winners[0]["metadata"]["resourceVersion"] != seen

    # A write decided on what is now stale changes nothing.
    assert await agent.swap(replica(key, "a", seen)) is None
    assert (await read(admin, first["metadata"]["name"]))["metadata"]["resourceVersion"] == stored.resource_version


async def test_a_stale_delete_deletes_nothing_a_current_one_does(leases, namespace):
    agent, admin = leases
    won = await agent.swap(replica(f"{namespace}/chat", "a"))
    name, old = won["metadata"]["name"], won["metadata"]["resourceVersion"]
    taken = await agent.swap(replica(f"{namespace}/chat", "b", old))  # another Mac took it over meanwhile
    assert taken is not None

    await agent.delete(name, old)  # a releases what it no longer holds: the 409 is swallowed
    assert parse_replica(await read(admin, name)).holder == "b"
    assert await agent.resource_version(name) == taken["metadata"]["resourceVersion"]

    await agent.delete(name, taken["metadata"]["resourceVersion"])
    assert await agent.resource_version(name) is None
    await agent.delete(name, taken["metadata"]["resourceVersion"])  # gone already: not an error


async def test_a_member_renewal_creates_renews_and_survives_a_foreign_write(leases):
    agent, admin = leases
    tag = secrets.token_hex(3)
    info = MemberInfo(Member(name=f"m-{tag}", labels={"size": "small"}), host="test-mac")

    def body(rv: str | None = None) -> dict:
        return member_lease(info, duration_s=40, now=now(), resource_version=rv)

    name = body()["metadata"]["name"]
    try:
        created = await agent.put(body(), None)  # no version known, none in the cluster: created
        v1 = created["metadata"]["resourceVersion"]
        renewed = await agent.put(body(), v1)
        v2 = renewed["metadata"]["resourceVersion"]
        assert v2 != v1 and await agent.resource_version(name) == v2

        # Someone else wrote it (a kubectl label, say): our version is stale. put reads it once
        # and renews; an update of a Lease at the stale version alone would be refused.
        foreign = await read(admin, name)
        foreign["metadata"]["labels"]["edited"] = "yes"
        await admin.api.replace_namespaced_custom_object(GROUP, VERSION, FLEET_NS, PLURAL, name, foreign)
        with pytest.raises(ApiException) as refused:
            await agent.api.replace_namespaced_custom_object(GROUP, VERSION, FLEET_NS, PLURAL, name, body(v2))
        assert refused.value.status == 409
        again = await agent.put(body(), v2)
        stored = await read(admin, name)
        assert stored["metadata"]["resourceVersion"] == again["metadata"]["resourceVersion"]
        assert "edited" not in stored["metadata"]["labels"] and stored["spec"]["holderIdentity"] == f"m-{tag}"

        listed = await agent.list(f"{ROLE_LABEL}=member,size=small")
        assert name in [lease["metadata"]["name"] for lease in listed]
        assert not await agent.list(f"{ROLE_LABEL}=member,{REPLICA_LABEL}=0")
    finally:
        await admin.delete(name, (await read(admin, name))["metadata"]["resourceVersion"])


async def test_outside_the_fleet_namespace_a_write_is_refused_not_swallowed(agent_api, namespace):
    """403 is not an answer like 409: a bid the agent may not make raises, and nothing is written."""
    elsewhere = LeaseClient(agent_api, namespace)
    with pytest.raises(ApiException) as refused:
        await elsewhere.swap(replica(f"{namespace}/chat", "a"))
    assert refused.value.status == 403
