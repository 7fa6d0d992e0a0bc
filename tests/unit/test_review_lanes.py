"""The authorizer's two lanes (adapters/kube/authorizer.py): what waits behind what, with a stand-in API.

Stand-ins are only for *when* the API answers (held open by the test); the
real kube-apiserver under a flood is tests/security/test_review_flood.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from kubernetes_asyncio import client

from metal_agent.adapters.kube.authorizer import MAX_CONCURRENT_REVIEWS, MAX_WAITING_REVIEWS, KubeAuthorizer
from metal_agent.core.review_limits import ReviewLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StandInAPI:
    """TokenReview/SubjectAccessReview that answer when the test lets them: `good` is an allowed identity."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()
        self.reviews: list[str] = []
        self.waiting = 0

    async def create_token_review(self, body):
        token = body["spec"]["token"]
        self.reviews.append(token)
        if not token.startswith("good"):
            self.waiting += 1
            try:
                await self.release.wait()
            finally:
                self.waiting -= 1
        user = SimpleNamespace(username="prom", uid="u", groups=[], extra={}) if token.startswith("good") else None
        return SimpleNamespace(status=SimpleNamespace(authenticated=user is not None, error="", user=user))

    async def create_subject_access_review(self, body):
        return SimpleNamespace(status=SimpleNamespace(allowed=True, denied=False))


def authorizer(clock: Clock, api: StandInAPI, **limits) -> KubeAuthorizer:
    auth = KubeAuthorizer(client.ApiClient(client.Configuration()), clock=clock,
                          limiter=ReviewLimiter(**limits) if limits else None)
    auth.authn = auth.authz = api
    return auth


async def test_junk_from_one_source_costs_its_burst_then_429_and_the_same_junk_is_not_reviewed_again():
    clock, api = Clock(), StandInAPI()
    auth = authorizer(clock, api)
    answers = [await auth.authorize(f"junk{i}", "get", "/metrics", "198.18.0.1") for i in range(2000)]
    assert len(api.reviews) == 10  # the source's burst
    assert sum(a.status == 401 for a in answers) == 10
    limited = [a for a in answers if a.status == 429]
    assert len(limited) == 1990 and all(a.retry_after > 0 for a in limited)
    assert (await auth.authorize("junk0", "get", "/v1/services", "198.18.0.1")).status == 401  # cached, by the token
    assert len(api.reviews) == 10


async def test_a_known_token_is_answered_while_unknown_reviews_are_stuck():
    clock, api = Clock(), StandInAPI()
    auth = authorizer(clock, api, per_source_rate=100.0, global_rate=100.0)
    assert (await auth.authorize("good", "get", "/metrics", "10.0.0.1")).allowed  # now known
    api.release.clear()  # the API server stops answering unknown tokens
    stuck = [asyncio.create_task(auth.authorize(f"junk{i}", "get", "/metrics", f"10.1.0.{i}")) for i in range(100)]
    while api.waiting < MAX_CONCURRENT_REVIEWS:
        await asyncio.sleep(0)
    # Cached: answered at once, no review.
    assert (await auth.authorize("good", "get", "/metrics", "10.1.0.1")).allowed
    # Expired: re-reviewed on the known lane, which the stuck unknown reviews do not hold.
    clock.now += 61
    sent = len(api.reviews)
    assert (await asyncio.wait_for(auth.authorize("good", "get", "/metrics", "10.1.0.1"), 5)).allowed
    assert api.reviews[sent:] == ["good"]
    # Beyond the unknown lane's waiting room: 429 at once, nothing sent.
    done = [t for t in stuck if t.done()]
    assert len(done) == 100 - MAX_WAITING_REVIEWS and all(t.result().status == 429 for t in done)
    assert api.waiting == MAX_CONCURRENT_REVIEWS
    api.release.set()
    results = await asyncio.gather(*stuck)
    assert sum(r.status == 401 for r in results) == MAX_WAITING_REVIEWS


async def test_a_good_token_from_another_address_is_reviewed_during_a_flood_from_one():
    clock, api = Clock(), StandInAPI()
    auth = authorizer(clock, api)
    for i in range(500):
        await auth.authorize(f"junk{i}", "get", "/metrics", "198.18.0.1")
    assert (await auth.authorize("good-new", "get", "/metrics", "198.18.0.9")).allowed


async def test_the_limiter_given_is_the_one_used():
    """An empty limiter (no source seen yet) is falsy: it must still be the one used (--token-review-rate)."""
    clock, api = Clock(), StandInAPI()
    auth = authorizer(clock, api, per_source_rate=100.0, global_rate=100.0)
    answers = [await auth.authorize(f"junk{i}", "get", "/metrics", "198.18.0.1") for i in range(50)]
    assert all(a.status == 401 for a in answers) and len(api.reviews) == 50
