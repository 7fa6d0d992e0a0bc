"""KubeAuthorizer on its own: real TokenReviews and SubjectAccessReviews, sent to the real
kube-apiserver as the agent identity (RBAC on), for real ServiceAccount tokens bound to the
shipped monitoring ClusterRole (manifests/monitoring/prometheus-rbac.yaml: `get /metrics`).
No agent, no HTTP server: what the HTTP gate would pass in (token, verb, path, source
address) goes straight to `authorize`.

The clock is the test's and does not move, so the review budget never refills and the
cache never expires behind the test's back. Reviews are counted where they land, in the
API server's own `apiserver_request_total{resource="tokenreviews"}`, and on the
authorizer's `reviews` counter. The whole agent under a flood is
tests/security/test_review_flood.py (root, network namespaces); this needs neither.
"""

from __future__ import annotations

import secrets

import pytest
from kubernetes_asyncio import client

from metal_agent.adapters.kube.authorizer import KubeAuthorizer
from metal_agent.core.review_limits import ReviewLimiter
from tests.support.kube import grant_monitoring, service_account_token
from tests.support.token_flood import junk, token_reviews
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

SOURCE_BURST = 2  # reviews of unknown tokens one source address may cost before 429


@pytest.fixture
async def tokens(admin_api, namespace):
    """{name: token}: `prometheus` is bound to the monitoring ClusterRole, `stranger` to nothing."""
    binding = f"authorizer-test-{namespace}"
    await grant_monitoring(admin_api, namespace, binding)
    try:
        yield {"prometheus": await service_account_token(admin_api, namespace, "prometheus", create=True),
               "stranger": await service_account_token(admin_api, namespace, "stranger", create=True)}
    finally:
        await client.RbacAuthorizationV1Api(admin_api).delete_cluster_role_binding(binding)


def authorizer(agent_api, burst: float = SOURCE_BURST) -> KubeAuthorizer:
    frozen = 1000.0
    return KubeAuthorizer(agent_api, clock=lambda: frozen,
                          limiter=ReviewLimiter(per_source_rate=1.0, per_source_burst=burst))


async def test_the_cluster_decides_who_may_get_metrics(agent_api, namespace, tokens):
    auth = authorizer(agent_api, burst=10)  # each (token, verb, path) is a review of its own
    allowed = await auth.authorize(tokens["prometheus"], "get", "/metrics", "10.0.0.1")
    assert allowed.status == 200 and allowed.user == f"system:serviceaccount:{namespace}:prometheus"
    assert auth.reviews == 1
    again = await auth.authorize(tokens["prometheus"], "get", "/metrics", "10.0.0.1")
    assert again.status == 200 and auth.reviews == 1  # cached: no second review

    other_path = await auth.authorize(tokens["prometheus"], "get", "/v1/services", "10.0.0.1")
    assert other_path.status == 403  # the role grants /metrics only
    assert (await auth.authorize(tokens["prometheus"], "create", "/metrics", "10.0.0.1")).status == 403

    stranger = await auth.authorize(tokens["stranger"], "get", "/metrics", "10.0.0.2")
    assert stranger.status == 403 and "stranger" in stranger.user  # known to the cluster, not granted

    [made_up] = junk(1)
    assert (await auth.authorize(made_up, "get", "/metrics", "10.0.0.3")).status == 401
    assert (await auth.authorize("not-even-a-jwt-" + secrets.token_hex(8), "get", "/metrics", "10.0.0.3")).status == 401


async def test_beyond_a_sources_budget_unknown_tokens_get_429_and_no_review_is_sent(agent_api, control_plane, tokens):
    auth = authorizer(agent_api)
    # The real scraper is allowed once, from its own address: its verdict is cached.
    assert (await auth.authorize(tokens["prometheus"], "get", "/metrics", "10.0.0.9")).status == 200
    before_api, before = await token_reviews(control_plane), auth.reviews

    flood = junk(SOURCE_BURST + 3)
    for token in flood[:SOURCE_BURST]:
        assert (await auth.authorize(token, "get", "/metrics", "10.6.6.6")).status == 401
    assert auth.reviews == before + SOURCE_BURST
    for token in flood[SOURCE_BURST:]:
        refused = await auth.authorize(token, "get", "/metrics", "10.6.6.6")
        assert refused.status == 429 and refused.retry_after > 0, refused
    assert auth.reviews == before + SOURCE_BURST  # nothing sent for the refused ones

    # Another address has a budget of its own; the cached scrape is answered even from the flooding one.
    assert (await auth.authorize(junk(1)[0], "get", "/metrics", "10.7.7.7")).status == 401
    assert (await auth.authorize(tokens["prometheus"], "get", "/metrics", "10.6.6.6")).status == 200
    assert auth.reviews == before + SOURCE_BURST + 1

    # The API server saw exactly the reviews that were sent (the refused ones were sent before the
    # last one: had any gone out, it would be counted by the time the last one is).
    expected = before_api + SOURCE_BURST + 1
    seen = await wait_for(lambda: _at_least(control_plane, expected), timeout=30, what="the API server's review count")
    assert seen == expected


async def _at_least(control_plane, count: float) -> float | None:
    seen = await token_reviews(control_plane)
    return seen if seen >= count else None
