"""Ask the cluster whether a bearer token may read the agent's metrics (TokenReview, then SubjectAccessReview).

The rules and the cache are in `core/metrics_auth.py`; this adapter only
makes the two API calls. Concurrent requests carrying the same token share
one pair of reviews, so a burst of scrapes is one round trip, and at most a
few reviews are in flight at once, so a flood of made-up tokens from the
network cannot turn the agent into a flood of reviews. An API server that
cannot be asked gives 503 (never cached), unless the same token was allowed
within the last ten minutes (core.metrics_auth.DecisionCache.stale_allowed).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.metrics_auth import (
    DecisionCache,
    Verdict,
    subject_access_review,
    token_review,
    verdict,
)

log = structlog.get_logger(__name__)

MAX_CONCURRENT_REVIEWS = 4


class KubeAuthorizer:
    def __init__(self, api: client.ApiClient, *, cache: DecisionCache | None = None) -> None:
        self.authn = client.AuthenticationV1Api(api)
        self.authz = client.AuthorizationV1Api(api)
        self.cache = cache or DecisionCache(clock=time.monotonic)
        self._inflight: dict[tuple[str, str, str], asyncio.Task[Verdict]] = {}
        self._reviewing = asyncio.Semaphore(MAX_CONCURRENT_REVIEWS)
        self.reviews = 0  # TokenReviews sent (tests and benchmarks read it)

    async def authorize(self, token: str, verb: str, path: str) -> Verdict:
        key = DecisionCache.key(token, verb, path)
        if (cached := self.cache.get(key)) is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = self._inflight[key] = asyncio.ensure_future(self._review(token, verb, path))
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        found = await asyncio.shield(task)
        if found.status == 503 and (stale := self.cache.stale_allowed(key)) is not None:
            return stale
        self.cache.put(key, found)
        return found

    async def _review(self, token: str, verb: str, path: str) -> Verdict:
        async with self._reviewing:
            return await self._review_now(token, verb, path)

    async def _review_now(self, token: str, verb: str, path: str) -> Verdict:
        self.reviews += 1
        try:
            review = await self.authn.create_token_review(token_review(token))
            status = _review_status(review.status)
            access = None
            if status.get("authenticated") and (status.get("user") or {}).get("username"):
                sar = await self.authz.create_subject_access_review(
                    subject_access_review(status["user"], verb, path))
                access = {"allowed": bool(sar.status and sar.status.allowed),
                          "denied": bool(sar.status and sar.status.denied)}
        except (ApiException, aiohttp.ClientError, OSError) as err:  # OSError covers timeouts
            log.warning("cannot verify a metrics scrape's token; answering 503",
                        error=f"{type(err).__name__}: {getattr(err, 'reason', err)}")
            return Verdict(503, "the cluster could not be asked to verify the token")
        found = verdict(status, access, verb, path)
        if not found.allowed:
            log.info("refused a metrics request", status=found.status, reason=found.reason, path=path)
        return found


def _review_status(status) -> dict:
    """A TokenReview's status as the plain dict core.metrics_auth reads."""
    if status is None:
        return {}
    user = status.user
    return {
        "authenticated": bool(status.authenticated),
        "error": status.error or "",
        "user": {"username": user.username or "", "uid": user.uid or "", "groups": list(user.groups or []),
                 "extra": dict(user.extra or {})} if user is not None else {},
    }
