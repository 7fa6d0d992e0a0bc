"""Issue 20, item 8: made-up bearer tokens cannot flood the API server with TokenReviews, nor make Prometheus wait.

Real parts: etcd + kube-apiserver (RBAC on), the real agent in a network
namespace (the "Mac") serving /metrics on its registered address, and real
ServiceAccount tokens bound to the shipped monitoring ClusterRole. Junk
tokens come from the root namespace (one source address, or many added
with tests/support/netns.add_sources). The TokenReviews are counted where
they land: the API server's own `apiserver_request_total{resource="tokenreviews"}`.

Each flood asserts the refusal (429 with Retry-After beyond the budget)
AND what was not sent (the API server received at most the budget's worth
of reviews), that a real scrape is answered while junk is being refused,
and that the refusals' log lines are a bounded sample.
"""

from __future__ import annotations

import asyncio
import json
import statistics

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.review_limits import GLOBAL_BURST_S, GLOBAL_RATE, PER_SOURCE_BURST_S, PER_SOURCE_RATE
from tests.support import netns
from tests.support.agent import agents_in_netns
from tests.support.kube import create_namespace, delete_namespace, grant_monitoring, service_account_token
from tests.support.token_flood import flood, junk, scrape_until, token_reviews
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

SOURCE_BURST = PER_SOURCE_RATE * PER_SOURCE_BURST_S  # 10
GLOBAL_BURST = GLOBAL_RATE * GLOBAL_BURST_S  # 20
SLACK = 3  # reviews a bound may be off by: clocks that differ, the known token's cache expiring mid-flood
SCRAPE_BOUND_S = 1.0  # a real scrape during the flood: generous for a loaded 2-core machine
REFUSALS = "llmkube_metal_agent_http_refusals_total"


@pytest.fixture(scope="module")
async def mac(control_plane, admin_api, llama_server_bin, tmp_path_factory):
    """(netns, agent, {name: token}): `prometheus`, `prometheus-2` may get /metrics."""
    workdir = tmp_path_factory.mktemp("review-flood")
    agent_namespace = await create_namespace(admin_api, prefix="agent")
    binding = f"flood-prometheus-{agent_namespace}"
    rbac = client.RbacAuthorizationV1Api(admin_api)
    await grant_monitoring(admin_api, agent_namespace, binding)
    tokens = {"prometheus": await service_account_token(admin_api, agent_namespace, "prometheus", create=True),
              "prometheus-2": await service_account_token(admin_api, agent_namespace, "prometheus")}
    (workdir / "agent").mkdir()
    try:
        async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                                   llama_server=llama_server_bin, workdir=workdir / "agent", namespaces=(agent_namespace,),
                                   extra_args=("--agent-namespace", agent_namespace, "--no-power")) as (ns, make_agent):
            agent = make_agent()
            await agent.start()
            await wait_for(lambda: _status(agent.metrics_url, None, 401), timeout=60,
                           what="/metrics on the registered address", on_timeout=agent.process.tail)
            yield ns, agent, tokens
    finally:
        try:
            await rbac.delete_cluster_role_binding(binding)
        except ApiException:
            pass
        await delete_namespace(admin_api, agent_namespace)


async def _status(url: str, token: str | None, expected: int) -> bool:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status == expected
    except (aiohttp.ClientError, OSError):
        return False


def refusal_lines(agent, reason: str) -> int:
    return sum(1 for line in agent.log_text().splitlines() if line.startswith("{")
               and (entry := json.loads(line)).get("event") == "refused a request" and entry.get("reason") == reason)


async def test_junk_tokens_from_one_source_cost_a_bounded_number_of_reviews_and_a_real_scrape_does_not_wait(
        mac, control_plane):
    ns, agent, tokens = mac
    url = agent.metrics_url
    assert await _status(url, tokens["prometheus"], 200)  # Prometheus has scraped before: a known token
    (other_source,) = await netns.add_sources(ns, 1)
    reviews_before = await token_reviews(control_plane)
    limited_before = await agent.metric(REFUSALS, {"reason": "ReviewRateLimited"}) or 0.0
    lines_before = refusal_lines(agent, "ReviewRateLimited"), refusal_lines(agent, "Unauthenticated")

    done = asyncio.Event()
    known = asyncio.create_task(scrape_until(url, tokens["prometheus"], done))  # from the flood's own address
    fresh = asyncio.create_task(scrape_until(url, tokens["prometheus-2"], done, source=other_source))
    try:
        junked = await flood(url, junk(2000), sources=[None], concurrency=32)
    finally:
        done.set()
    known, fresh = await known, await fresh
    sent = await token_reviews(control_plane) - reviews_before

    # What was sent: one source's budget of junk, plus the fresh token's one review from elsewhere.
    bound = SOURCE_BURST + PER_SOURCE_RATE * junked.seconds + 1 + SLACK
    print(f"FLOOD one source: 2000 junk tokens in {junked.seconds:.2f}s -> {dict(junked.statuses)}; "
          f"TokenReviews received by the API server: {sent:.0f} (bound {bound:.1f}); known-token scrapes "
          f"{len(known.latencies)}, max {max(known.latencies) * 1000:.0f} ms, "
          f"p50 {statistics.median(known.latencies) * 1000:.0f} ms")
    assert 1 <= sent <= bound
    assert set(junked.statuses) <= {401, 429} and junked.statuses[429] >= 2000 - bound
    assert junked.retry_after_missing == 0
    assert await agent.metric(REFUSALS, {"reason": "ReviewRateLimited"}) == limited_before + junked.statuses[429]

    # The known token was answered while junk was being refused, every time, and fast.
    assert set(known.statuses) == {200} and set(fresh.statuses) == {200}
    assert any(junked.first_429 < t < junked.last_429 for t in known.answered_at)
    assert max(known.latencies) < SCRAPE_BOUND_S

    # The log has a sample, not a line per refusal.
    assert refusal_lines(agent, "ReviewRateLimited") - lines_before[0] <= 5
    assert refusal_lines(agent, "Unauthenticated") - lines_before[1] <= 5


async def test_the_same_junk_token_again_is_not_reviewed_again(mac, control_plane):
    ns, agent, _ = mac
    (source,) = await netns.add_sources(ns, 1)  # a budget of its own: the first try is reviewed
    (token,) = junk(1)
    before = await token_reviews(control_plane)
    result = await flood(agent.metrics_url, [token] * 200, sources=[source], concurrency=8)
    assert dict(result.statuses) == {401: 200}  # cached by the token's digest, briefly
    assert await token_reviews(control_plane) - before == 1


async def test_many_sources_together_are_held_to_the_global_budget(mac, control_plane):
    ns, agent, tokens = mac
    sources = await netns.add_sources(ns, 40)
    assert await _status(agent.metrics_url, tokens["prometheus"], 200)
    before = await token_reviews(control_plane)
    done = asyncio.Event()
    known = asyncio.create_task(scrape_until(agent.metrics_url, tokens["prometheus"], done))
    try:
        junked = await flood(agent.metrics_url, junk(2000), sources=sources, concurrency=40)
    finally:
        done.set()
    known = await known
    sent = await token_reviews(control_plane) - before
    bound = GLOBAL_BURST + GLOBAL_RATE * junked.seconds + SLACK
    print(f"FLOOD 40 sources: 2000 junk tokens in {junked.seconds:.2f}s -> {dict(junked.statuses)}; "
          f"TokenReviews received: {sent:.0f} (bound {bound:.1f}); known-token scrapes max "
          f"{max(known.latencies) * 1000:.0f} ms")
    assert 1 <= sent <= bound  # 40 sources x a 10-review burst would be 400 without the global budget
    assert junked.statuses[429] >= 2000 - bound and junked.retry_after_missing == 0
    assert set(known.statuses) == {200} and max(known.latencies) < SCRAPE_BOUND_S
    assert any(junked.first_429 < t < junked.last_429 for t in known.answered_at)
