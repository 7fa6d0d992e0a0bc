"""The front door's access sources against the real kube-apiserver (RBAC on), as the agent identity.

- Nodes -> networks: a Node created, re-addressed and deleted changes the policy (and calls
  on_change); an identity that may not list Nodes falls back to the owner's networks.
- API keys: the Secret an InferenceService names becomes digests (never the key), a rotated
  key replaces the old one within a watch event, and a missing, unreadable or foreign Secret
  leaves no key working, with a reason.
- Reviews: a ServiceAccount bound to the sample client Role (manifests/samples/front-door-client.yaml:
  `get inferenceservices/proxy`) is allowed on its service only; one without it is refused; a
  flood of junk tokens costs the API server no more reviews than the budget.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from kubernetes_asyncio import client
from structlog.testing import capture_logs

from metal_agent.adapters.kube.api_keys import ANNOTATION, FORBIDDEN, INVALID, NOT_FOUND, ApiKeys
from metal_agent.adapters.kube.cluster_networks import ClusterNetworks
from metal_agent.controller.access import AccessSource
from metal_agent.core.access import (
    AccessMode,
    AccessSettings,
    Allow,
    Review,
    ServiceKeys,
    decide,
    key_digest,
    review_outcome,
)
from metal_agent.core.review_limits import ReviewLimiter
from tests.support.kube import service_account_token
from tests.support.token_flood import junk, token_reviews
from tests.support.front_door_grants import grant_client, grant_key_reader
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

KEY_A = "key-a-" + "1" * 32
KEY_B = "key-b-" + "2" * 32







def isvc(namespace: str, name: str, annotation: str | None) -> dict:
    meta = {"namespace": namespace, "name": name, "annotations": {ANNOTATION: annotation} if annotation else {}}
    return {"metadata": meta, "spec": {"modelRef": name}}


def secret(name: str, **data: str) -> dict:
    return {"metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


async def token_client(control_plane, token: str) -> client.ApiClient:
    configuration = client.Configuration(host=control_plane.url)
    configuration.ssl_ca_cert = str(control_plane.pki.ca_cert)
    configuration.api_key = {"BearerToken": token}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(configuration)


@pytest.fixture
async def running():
    """Start `.run()` of what the test builds; cancel all at the end."""
    tasks: list[asyncio.Task] = []
    yield lambda part: tasks.append(asyncio.ensure_future(part.run()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- Nodes -----------------------------------------------------------------------------------------

async def test_nodes_become_networks_and_stay_current(admin_api, agent_api, running, namespace):
    core = client.CoreV1Api(admin_api)
    name = f"node-{namespace}"
    changes: list[int] = []
    nets = ClusterNetworks(agent_api, lambda: changes.append(1))
    running(nets)
    await wait_for(nets.synced.is_set, timeout=30, what="the Node list")
    await core.create_node({"metadata": {"name": name}, "spec": {"podCIDRs": ["10.77.3.0/24", "fd77:3::/64"]}})
    try:
        await wait_for(lambda: "10.77.3.0/24" in nets.networks(), timeout=30, what="the pod CIDR")
        await core.patch_node_status(name, {"status": {"addresses": [
            {"type": "InternalIP", "address": "192.168.77.10"}, {"type": "ExternalIP", "address": "2001:db8::77"},
            {"type": "Hostname", "address": "worker-77"}]}})
        await wait_for(lambda: {"192.168.77.10/32", "2001:db8::77/128"} <= set(nets.networks()), timeout=30,
                       what="the Node's addresses")
        assert not any("worker" in n for n in nets.networks())
        seen = len(changes)
        await core.patch_node_status(name, {"status": {"addresses": [{"type": "InternalIP", "address": "192.168.77.11"}]}})
        await wait_for(lambda: "192.168.77.11/32" in nets.networks(), timeout=30, what="the new address")
        assert "192.168.77.10/32" not in nets.networks() and len(changes) > seen
        assert nets.permitted is True
    finally:
        await core.delete_node(name)
    await wait_for(lambda: not any(n.startswith(("10.77.3.", "192.168.77.")) for n in nets.networks()), timeout=30,
                   what="the deleted Node's networks gone")


async def test_the_source_policy_joins_owner_and_cluster_networks(admin_api, agent_api, running, namespace):
    core = client.CoreV1Api(admin_api)
    name = f"node-{namespace}"
    pushed: list[int] = []
    source = AccessSource(agent_api, AccessSettings(allow_networks=("100.64.0.0/10",)), {}, lambda: pushed.append(1))
    running(source)
    await core.create_node({"metadata": {"name": name}, "spec": {"podCIDRs": ["10.78.0.0/24"]}})
    try:
        await wait_for(lambda: "10.78.0.0/24" in source.policy().networks, timeout=30, what="the policy")
        assert "100.64.0.0/10" in source.policy().networks and pushed
        assert decide(source.policy(), ServiceKeys(), "10.78.0.9", None) == Allow("network")
        assert decide(source.policy(), ServiceKeys(), "100.100.1.1", None) == Allow("network")
        assert decide(source.policy(), ServiceKeys(), "10.79.0.9", None).status == 401
    finally:
        await core.delete_node(name)


async def test_without_permission_to_list_nodes_only_the_owners_networks_count(
        admin_api, control_plane, running, namespace):
    token = await service_account_token(admin_api, namespace, "no-nodes", create=True)
    api = await token_client(control_plane, token)
    try:
        source = AccessSource(api, AccessSettings(allow_networks=("192.0.2.0/24",)), {})
        source.cluster.forbidden_retry = 3600.0
        running(source)
        await wait_for(lambda: source.cluster.permitted is False, timeout=30, what="the refusal noticed")
        assert source.policy().networks == ("192.0.2.0/24",)
        assert source.policy().mode is AccessMode.CLUSTER
    finally:
        await api.close()


async def test_permission_to_list_nodes_granted_later_lets_the_cluster_in(admin_api, control_plane, running, namespace):
    core, rbac = client.CoreV1Api(admin_api), client.RbacAuthorizationV1Api(admin_api)
    node, role = f"node-{namespace}", f"nodes-{namespace}"
    await core.create_node({"metadata": {"name": node}, "spec": {"podCIDRs": ["10.79.5.0/24"]}})
    token = await service_account_token(admin_api, namespace, "late-nodes", create=True)
    api = await token_client(control_plane, token)
    try:
        nets = ClusterNetworks(api, forbidden_retry=0.05)
        with capture_logs() as logs:
            running(nets)
            await wait_for(lambda: nets.refusals >= 3, timeout=30, what="three refusals")
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1 and "may not list Nodes" in warnings[0]["event"], logs  # said once, clearly
        assert nets.networks() == ()
        await rbac.create_cluster_role(client.V1ClusterRole(metadata=client.V1ObjectMeta(name=role), rules=[
            client.V1PolicyRule(api_groups=[""], resources=["nodes"], verbs=["list", "watch"])]))
        await rbac.create_cluster_role_binding({
            "metadata": {"name": role}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                    "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "late-nodes", "namespace": namespace}]})
        await wait_for(lambda: "10.79.5.0/24" in nets.networks(), timeout=30, what="the Node after the grant")
        assert nets.permitted is True
    finally:
        await api.close()
        await core.delete_node(node)
        for delete in (rbac.delete_cluster_role_binding, rbac.delete_cluster_role):
            await delete(role)


def test_open_mode_watches_no_nodes(agent_api):
    assert AccessSource(agent_api, AccessSettings(mode=AccessMode.OPEN), {}).cluster is None


# -- API keys --------------------------------------------------------------------------------------

async def test_a_named_secret_becomes_digests_and_a_rotated_key_replaces_the_old(admin_api, agent_api, running, namespace):
    core = client.CoreV1Api(admin_api)
    await grant_key_reader(admin_api, namespace, ["chat-keys"])
    await core.create_namespaced_secret(namespace, secret("chat-keys", token=KEY_A))
    key = f"{namespace}/chat"
    changed: list[int] = []
    cache = {key: isvc(namespace, "chat", "chat-keys/token")}
    source = AccessSource(agent_api, AccessSettings(mode=AccessMode.OPEN), cache, lambda: changed.append(1))
    running(source)
    await wait_for(lambda: source.keys(key).digests, timeout=30, what="the key's digest")
    assert source.keys(key) == ServiceKeys((key_digest(KEY_A),)) and source.problem(key) is None
    assert decide(source.policy(), source.keys(key), "203.0.113.1", f"Bearer {KEY_A}") == Allow("open")

    # Rotation: both for a while (one per line), then only the new one.
    await core.patch_namespaced_secret("chat-keys", namespace, secret("chat-keys", token=f"{KEY_A}\n{KEY_B}\n"))
    await wait_for(lambda: len(source.keys(key).digests) == 2, timeout=30, what="both keys")
    await core.patch_namespaced_secret("chat-keys", namespace, secret("chat-keys", token=KEY_B))
    await wait_for(lambda: source.keys(key) == ServiceKeys.of([KEY_B]), timeout=30, what="only the new key")
    assert changed

    # The annotation gone: no key; back, then the Secret deleted: no key, and a reason.
    source.on_isvc_change(cache[key], isvc(namespace, "chat", None))
    assert source.keys(key) == ServiceKeys() and source.problem(key) is None
    source.on_isvc_change(None, isvc(namespace, "chat", "chat-keys/token"))
    await wait_for(lambda: source.keys(key).digests, timeout=30, what="the key again")
    await core.delete_namespaced_secret("chat-keys", namespace)
    await wait_for(lambda: source.problem(key) is not None, timeout=30, what="the deleted Secret noticed")
    assert source.problem(key).reason == NOT_FOUND and source.keys(key) == ServiceKeys()


async def test_a_missing_key_bad_value_or_unreadable_secret_leaves_no_key_working(admin_api, agent_api, running, namespace):
    core = client.CoreV1Api(admin_api)
    await grant_key_reader(admin_api, namespace, ["keys", "short"])
    await core.create_namespaced_secret(namespace, secret("keys", other=KEY_A))
    await core.create_namespaced_secret(namespace, secret("short", **{"api-key": "tiny"}))
    await core.create_namespaced_secret(namespace, secret("not-granted", **{"api-key": KEY_A}))
    keys = ApiKeys(agent_api, forbidden_retry=3600.0)
    expected = {"a": INVALID, "b": INVALID, "c": FORBIDDEN, "d": FORBIDDEN, "e": INVALID}
    with capture_logs() as logs:
        running(keys)
        keys.update(f"{namespace}/a", {ANNOTATION: "keys"})  # default key `api-key`: absent
        keys.update(f"{namespace}/b", {ANNOTATION: "short"})
        keys.update(f"{namespace}/c", {ANNOTATION: "not-granted"})
        keys.update(f"{namespace}/d", {ANNOTATION: "absent"})
        keys.update(f"{namespace}/e", {ANNOTATION: "other-ns/keys/api-key"})
        for name, reason in expected.items():
            found = await wait_for(lambda n=name: keys.problem(f"{namespace}/{n}"), timeout=30, what=f"{name}'s problem")
            assert found.reason == reason, (name, found)
            assert keys.keys(f"{namespace}/{name}") == ServiceKeys()
            assert KEY_A not in found.message and "tiny" not in found.message
    said = [e for e in logs if e.get("service", "").startswith(namespace)]
    assert {e["service"].rpartition("/")[2] for e in said} == set(expected)  # each service named in a log line
    assert KEY_A not in repr(logs) and "tiny" not in repr(logs)
    assert "has no key 'api-key'" in keys.problem(f"{namespace}/a").message
    assert "optional-api-key-reader.yaml" in keys.problem(f"{namespace}/c").message


async def test_granting_the_secret_later_takes_effect(admin_api, agent_api, running, namespace):
    core = client.CoreV1Api(admin_api)
    await core.create_namespaced_secret(namespace, secret("late", **{"api-key": KEY_A}))
    keys = ApiKeys(agent_api, forbidden_retry=0.2)
    running(keys)
    keys.update(f"{namespace}/s", {ANNOTATION: "late"})
    await wait_for(lambda: keys.problem(f"{namespace}/s"), timeout=30, what="forbidden first")
    await grant_key_reader(admin_api, namespace, ["late"])
    await wait_for(lambda: keys.keys(f"{namespace}/s").digests, timeout=30, what="the key after the grant")
    assert keys.problem(f"{namespace}/s") is None


# -- reviews ---------------------------------------------------------------------------------------

async def test_a_token_allowed_on_its_service_and_nowhere_else(admin_api, agent_api, namespace):
    await grant_client(admin_api, namespace, "chat")
    allowed = await service_account_token(admin_api, namespace, "chat-client")
    stranger = await service_account_token(admin_api, namespace, "stranger", create=True)
    frozen = 1000.0
    source = AccessSource(agent_api, AccessSettings(), {}, clock=lambda: frozen)
    review = decide(source.policy(), ServiceKeys(), "203.0.113.5", f"Bearer {allowed}")
    assert review == Review(allowed)

    ok, reason = await source.review(allowed, f"{namespace}/chat", "203.0.113.5")
    assert ok, reason
    assert source.authorizer.reviews == 1
    assert (await source.answer(allowed, f"{namespace}/chat", "203.0.113.5"))["status"] == 200
    assert (await source.review(allowed, f"{namespace}/chat", "203.0.113.5"))[0]
    assert source.authorizer.reviews == 1  # cached by the token's digest

    ok, reason = await source.review(allowed, f"{namespace}/other", "203.0.113.5")
    assert not ok and "forbidden" in reason and allowed not in reason
    ok, reason = await source.review(allowed, f"other-{namespace}/chat", "203.0.113.5")
    assert not ok
    ok, reason = await source.review(stranger, f"{namespace}/chat", "203.0.113.6")
    assert not ok and "stranger" in reason and stranger not in reason
    [made_up] = junk(1)
    found = await source.verdict(made_up, f"{namespace}/chat", "203.0.113.7")
    assert found.status == 401
    assert (await source.review(allowed, "no-slash", "203.0.113.5")) == (False, "forbidden: no such service")


async def test_a_flood_of_junk_tokens_costs_no_more_reviews_than_the_budget(
        admin_api, agent_api, control_plane, namespace):
    await grant_client(admin_api, namespace, "chat")
    allowed = await service_account_token(admin_api, namespace, "chat-client")
    frozen = 1000.0
    burst = 3
    source = AccessSource(agent_api, AccessSettings(), {}, clock=lambda: frozen,
                          limiter=ReviewLimiter(per_source_rate=1.0, per_source_burst=burst,
                                                global_rate=10.0, global_burst=5))
    key = f"{namespace}/chat"
    assert (await source.review(allowed, key, "10.9.9.9"))[0]
    before_api, before = await token_reviews(control_plane), source.authorizer.reviews

    statuses = [(await source.verdict(t, key, "198.51.100.66")).status for t in junk(50)]
    assert statuses[:burst] == [401] * burst and set(statuses[burst:]) == {429}, statuses
    others = [(await source.verdict(t, key, f"198.51.100.{i}")).status for i, t in enumerate(junk(10))]
    left = 5 - 1 - burst  # the global burst, less the allowed token's first review and the flooder's
    assert others[:left] == [401] * left and set(others[left:]) == {429}  # the global budget holds
    no_peer = [(await source.verdict(t, key)).status for t in junk(5)]
    assert set(no_peer) == {429}
    answer = await source.answer(junk(1)[0], key, "198.51.100.66")  # what the agent's socket would send back
    assert answer["status"] == 429 and answer["allowed"] is False and answer["retry_after"] > 0
    refusal, ttl, retry = review_outcome(answer)
    assert refusal.status == 429 and ttl == 0.0 and retry > 0  # the front door must not cache it
    assert (await source.review(allowed, key, "198.51.100.66"))[0]  # the known token passes during the flood
    sent = source.authorizer.reviews - before
    assert sent == burst + left
    expected = before_api + sent
    seen = await wait_for(lambda: _at_least(control_plane, expected), timeout=30, what="the API server's count")
    assert seen == expected


async def _at_least(control_plane, count: float) -> float | None:
    seen = await token_reviews(control_plane)
    return seen if seen >= count else None
