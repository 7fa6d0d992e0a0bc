"""Ask the cluster whether a bearer token may read the agent's metrics (TokenReview, then SubjectAccessReview).

The rules and the cache are in `core/metrics_auth.py`; this adapter only
makes the two API calls. Concurrent requests carrying the same token share
one pair of reviews, so a burst of scrapes is one round trip. An API server
that cannot be asked gives 503 (never cached), unless the same token was
allowed within the last ten minutes (core.metrics_auth.DecisionCache.stale_allowed).

A flood of made-up tokens from the network must not become a flood of
reviews, nor make Prometheus wait. So reviews run on two lanes:

- *known*: a token the cluster allowed for this request recently. A fresh
  verdict is answered from the cache without waiting on anything; an
  expired one is re-reviewed here, on a lane of its own that unknown
  tokens never enter.
- *unknown*: everything else. Each review spends the sending address's
  budget and the global one (`core/review_limits.py`); beyond either, or
  with too many already waiting, the answer is 429 with Retry-After and
  nothing is sent. At most a few run at once.
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
from metal_agent.core.review_limits import GLOBAL, ReviewLimiter

log = structlog.get_logger(__name__)

MAX_CONCURRENT_REVIEWS = 4  # unknown tokens reviewed at once
MAX_WAITING_REVIEWS = 16  # unknown-token reviews admitted but not finished; beyond: 429
KNOWN_CONCURRENCY = 2  # re-reviews of recently allowed tokens at once (their own lane)
KNOWN, UNKNOWN = "known", "unknown"


class KubeAuthorizer:
    def __init__(self, api: client.ApiClient, *, cache: DecisionCache | None = None,
                 limiter: ReviewLimiter | None = None, reviews_counter=None,
                 clock=time.monotonic, access_review=subject_access_review,
                 purpose: str = "a metrics scrape") -> None:
        """`access_review(user, verb, path)`: the SubjectAccessReview to send for an identity
        (default: may it `verb` the non-resource URL `path`); the front door's reviewer asks
        about a resource instead (controller/access.py). `purpose` names the caller in logs."""
        self.authn = client.AuthenticationV1Api(api)
        self.authz = client.AuthorizationV1Api(api)
        self._clock = clock
        self.cache = cache if cache is not None else DecisionCache(clock=clock)  # (an empty one is falsy)
        self.limiter = limiter if limiter is not None else ReviewLimiter()
        self._inflight: dict[tuple[str, str, str], asyncio.Task[Verdict]] = {}
        self._lanes = {KNOWN: asyncio.Semaphore(KNOWN_CONCURRENCY), UNKNOWN: asyncio.Semaphore(MAX_CONCURRENT_REVIEWS)}
        self._unknown_pending = 0
        self._counter = reviews_counter  # a prometheus Counter labelled by lane, or None
        self.reviews = 0  # TokenReviews sent (tests and benchmarks read it)
        self._access_review = access_review
        self._purpose = purpose

    async def authorize(self, token: str, verb: str, path: str, source: str = "") -> Verdict:
        key = DecisionCache.key(token, verb, path)
        if (cached := self.cache.get(key)) is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            lane = KNOWN if self.cache.known(key) else UNKNOWN
            if lane == UNKNOWN:
                if (refused := self._admit(source)) is not None:
                    return refused
                self._unknown_pending += 1  # counted from admission: requests in one tick see each other
            task = self._inflight[key] = asyncio.ensure_future(self._review(token, verb, path, lane))
            task.add_done_callback(lambda _, lane=lane: self._finished(key, lane))
        found = await asyncio.shield(task)
        if found.status == 503 and (stale := self.cache.stale_allowed(key)) is not None:
            return stale
        self.cache.put(key, found)
        return found

    def _admit(self, source: str) -> Verdict | None:
        """None: an unknown token may be reviewed now (its budget is spent); else the 429."""
        if self._unknown_pending >= MAX_WAITING_REVIEWS:
            return Verdict(429, "too many token reviews are waiting; retry later", retry_after=1.0)
        admission = self.limiter.admit(source, self._clock())
        if admission.admitted:
            return None
        who = "from all sources" if admission.scope == GLOBAL else "from this address"
        return Verdict(429, f"too many reviews of unknown tokens {who}; retry later",
                       retry_after=admission.retry_after)

    def _finished(self, key: tuple[str, str, str], lane: str) -> None:
        self._inflight.pop(key, None)
        if lane == UNKNOWN:
            self._unknown_pending -= 1

    async def _review(self, token: str, verb: str, path: str, lane: str) -> Verdict:
        async with self._lanes[lane]:
            if self._counter is not None:
                self._counter.labels(lane).inc()
            return await self._review_now(token, verb, path)

    async def _review_now(self, token: str, verb: str, path: str) -> Verdict:
        self.reviews += 1
        try:
            review = await self.authn.create_token_review(token_review(token))
            status = _review_status(review.status)
            access = None
            if status.get("authenticated") and (status.get("user") or {}).get("username"):
                sar = await self.authz.create_subject_access_review(
                    self._access_review(status["user"], verb, path))
                access = {"allowed": bool(sar.status and sar.status.allowed),
                          "denied": bool(sar.status and sar.status.denied)}
        except (ApiException, aiohttp.ClientError, OSError) as err:  # OSError covers timeouts
            log.warning(f"cannot verify {self._purpose}'s token; answering 503",
                        error=f"{type(err).__name__}: {getattr(err, 'reason', err)}")
            return Verdict(503, "the cluster could not be asked to verify the token")
        return verdict(status, access, verb, path)  # a refusal is logged (sampled) by the HTTP gate


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
