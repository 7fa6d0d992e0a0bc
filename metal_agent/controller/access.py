"""What the front door needs to decide who may call a model, kept current by the agent.

The front door decides each request itself (core/access.decide) from what the
agent pushes with the routing table: the policy (the mode, and the networks
let in without a credential: the owner's `--front-door-allow-network` plus the
cluster's Node addresses and pod CIDRs, adapters/kube/cluster_networks.py)
and each service's API-key digests (adapters/kube/api_keys.py). When a bearer
is a token, it asks the agent (`review`): TokenReview, then a
SubjectAccessReview for verb `get` on `inferenceservices/proxy` of that
InferenceService, through the same authorizer /metrics uses, so the same
cache (by the token's digest), the same two lanes and the same budget of
reviews of unknown tokens (core/review_limits.py) hold a flood of junk
tokens to a few reviews a second.

`on_change()` is called whenever `policy()` or any `keys(key)` changes: the
agent then pushes a new table. `on_isvc_change` must be wired to the
InferenceService informer (an annotation names the Secret of the keys).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Mapping

from kubernetes_asyncio import client

from metal_agent.adapters.kube.api_keys import ApiKeys, Problem
from metal_agent.adapters.kube.authorizer import KubeAuthorizer
from metal_agent.adapters.kube.cluster_networks import ClusterNetworks
from metal_agent.adapters.kube.informer import object_key
from metal_agent.core.access import (
    PROXY_VERB,
    AccessMode,
    AccessPolicy,
    AccessSettings,
    ServiceKeys,
    proxy_access_review,
    review_answer,
)
from metal_agent.core.conditions import Condition
from metal_agent.core.metrics_auth import Verdict
from metal_agent.core.status import API_KEY_READY
from metal_agent.core.review_limits import ReviewLimiter



class AccessSource:
    def __init__(self, api: client.ApiClient, settings: AccessSettings, isvcs: Mapping[str, dict],
                 on_change: Callable[[], None] = lambda: None, *, clock: Callable[[], float] = time.monotonic,
                 reviews_counter=None, limiter: ReviewLimiter | None = None,
                 on_service: Callable[[str], None] = lambda key: None) -> None:
        """`on_service(key)`: a service's API keys changed (its condition may have: reconcile it)."""
        self.settings = settings
        self.isvcs = isvcs
        self.on_change = on_change
        self.on_service = on_service
        self.cluster = ClusterNetworks(api, self._changed) if settings.mode is AccessMode.CLUSTER else None
        self.api_keys = ApiKeys(api, self._keys_changed)
        self.authorizer = KubeAuthorizer(
            api, clock=clock, reviews_counter=reviews_counter, access_review=proxy_access_review,
            purpose="a front door request",
            limiter=limiter if limiter is not None else ReviewLimiter(  # (an empty one is falsy)
                per_source_rate=settings.token_review_rate, global_rate=settings.token_review_global_rate))
        self._policy = self._compute_policy()

    # -- what the table carries ----------------------------------------------------------------------

    def policy(self) -> AccessPolicy:
        return self._policy

    def keys(self, key: str) -> ServiceKeys:
        return self.api_keys.keys(key)

    def problem(self, key: str) -> Problem | None:
        """Why no API key works for this service (a reason and message for a condition or Event)."""
        return self.api_keys.problem(key)

    def condition(self, key: str) -> Condition | None:
        """`MetalApiKeyReady` for a service whose annotation names a Secret of API keys: False with
        the reason and a message naming the Secret (never a key) while no key can work; None for a
        service without the annotation, or whose Secret has not been read yet."""
        if not self.api_keys.annotated(key):
            return None
        if (problem := self.api_keys.problem(key)) is not None:
            return Condition(API_KEY_READY, False, problem.reason, problem.message)
        if not self.api_keys.keys(key).digests:
            return None
        return Condition(API_KEY_READY, True, "ApiKeysLoaded",
                         f"the front door accepts the API keys of Secret {self.api_keys.secret_of(key)}")

    # -- inputs --------------------------------------------------------------------------------------

    def on_isvc_change(self, old: dict | None, new: dict | None) -> None:
        obj = new or old
        self.api_keys.update(object_key(obj), (new or {}).get("metadata", {}).get("annotations") if new else None)

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The watches that keep the sources current, each its own loop for the agent's
        `supervised_loop` (a failing Nodes watch restarts alone, the keys keep being read)."""
        found: dict[str, Callable[[], Awaitable[None]]] = {"front-door-api-keys": self._keys}
        if self.cluster is not None:
            found["front-door-nodes"] = self.cluster.run
        return found

    async def run(self) -> None:
        """Every loop at once, for tests that drive a source on its own."""
        await asyncio.gather(*(loop() for loop in self.loops().values()))

    async def _keys(self) -> None:
        """Read what the cache holds now (services known before this loop began), then keep
        the API keys current until cancelled."""
        for obj in list(self.isvcs.values()):
            self.on_isvc_change(None, obj)
        await self.api_keys.run()

    # -- the cluster's word on a token ----------------------------------------------------------------

    async def verdict(self, token: str, key: str, peer: str = "") -> Verdict:
        """The authorizer's verdict: 200, 401 (unknown token), 403 (not allowed), 429 (over the
        budget of reviews of unknown tokens; `retry_after`), 503 (the cluster cannot be asked)."""
        namespace, slash, name = key.partition("/")
        if not slash or not namespace or not name or "/" in name:
            return Verdict(403, "forbidden: no such service")
        # Without the client's address, the budget "per source" is per service: a flood aimed at one
        # service cannot spend another's (the global budget still bounds them all).
        return await self.authorizer.authorize(token, PROXY_VERB, key, peer or f"service {key}")

    async def answer(self, token: str, key: str, peer: str = "") -> dict:
        """The JSON answer for `POST /review` (core.access.review_answer: allowed, reason, status, retry_after)."""
        found = await self.verdict(token, key, peer)
        return review_answer(found.status, found.reason, found.retry_after)

    async def review(self, token: str, key: str, peer: str = "") -> tuple[bool, str]:
        """(allowed, reason) for `POST /review` on the agent's socket; the reason never holds the token."""
        found = await self.verdict(token, key, peer)
        return found.allowed, found.reason

    # -- internals -----------------------------------------------------------------------------------

    def _compute_policy(self) -> AccessPolicy:
        cluster = self.cluster.networks() if self.cluster is not None else ()
        return AccessPolicy(self.settings.mode, tuple(self.settings.allow_networks) + cluster)

    def _changed(self) -> None:
        self._policy = self._compute_policy()
        self.on_change()

    def _keys_changed(self, service: str) -> None:
        self._changed()
        self.on_service(service)
