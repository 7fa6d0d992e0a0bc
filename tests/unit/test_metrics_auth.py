"""Who may read /metrics from the network: the decision rules, the cache, and the HTTP gate.

The reviews themselves run against a real kube-apiserver in
tests/integration/test_cluster_prometheus.py; here is the logic around them.
"""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from metal_agent.adapters.http_server import auth_middleware
from metal_agent.core.metrics_auth import (
    DecisionCache,
    Verdict,
    bearer_token,
    identity,
    is_loopback,
    needs_authentication,
    subject_access_review,
    token_digest,
    verb_for,
    verdict,
)


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("198.18.0.2", False), ("100.64.1.2", False), ("fd7a:115c::1", False), ("0.0.0.0", False),
    (None, False), ("", False), ("not-an-ip", False), ("fe80::1%eth0", False),
])
def test_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_what_needs_a_token():
    assert needs_authentication("198.18.0.2", "/metrics")
    assert needs_authentication("198.18.0.2", "/v1/services")
    assert not needs_authentication("198.18.0.2", "/healthz")
    assert not needs_authentication("198.18.0.2", "/readyz")
    assert not needs_authentication("127.0.0.1", "/metrics")


@pytest.mark.parametrize("header,token", [
    ("Bearer abc.def", "abc.def"), ("bearer abc", "abc"), ("  Bearer   abc  ", "abc"),
    ("Basic dXNlcg==", None), ("Bearer", None), ("Bearer ", None), ("Bearer a b", None), (None, None), ("", None),
])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_verbs_are_the_api_servers():
    assert [verb_for(m) for m in ("GET", "HEAD", "POST", "DELETE")] == ["get", "get", "create", "delete"]


USER = {"username": "system:serviceaccount:monitoring:prometheus", "uid": "u-1",
        "groups": ["system:serviceaccounts", "system:authenticated"], "extra": {"authentication.kubernetes.io/pod-name": ["p"]}}


def test_the_access_review_asks_for_the_non_resource_url_as_that_identity():
    body = subject_access_review(USER, "get", "/metrics")
    assert body["kind"] == "SubjectAccessReview"
    assert body["spec"] == {"user": USER["username"], "uid": "u-1", "groups": USER["groups"],
                            "extra": USER["extra"], "nonResourceAttributes": {"path": "/metrics", "verb": "get"}}
    assert "resourceAttributes" not in body["spec"]


def test_verdicts():
    authenticated = {"authenticated": True, "user": USER}
    assert verdict(authenticated, {"allowed": True}, "get", "/metrics") == Verdict(200, "allowed", USER["username"])
    refused = verdict(authenticated, {"allowed": False}, "get", "/metrics")
    assert refused.status == 403 and USER["username"] in refused.reason and '"/metrics"' in refused.reason
    assert verdict(authenticated, {"allowed": True, "denied": True}, "get", "/metrics").status == 403
    assert verdict({"authenticated": False, "error": "invalid bearer token"}, None, "get", "/metrics") == \
        Verdict(401, "unauthenticated: invalid bearer token")
    assert verdict({"authenticated": True, "user": {}}, None, "get", "/metrics").status == 401
    assert identity({"authenticated": True, "user": {"username": ""}}) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_allowed_is_cached_longer_than_denied_and_503_never():
    clock = Clock()
    cache = DecisionCache(clock=clock, allowed_ttl=60, denied_ttl=10)
    ok, no, away = (DecisionCache.key(t, "get", "/metrics") for t in ("good", "bad", "api-away"))
    cache.put(ok, Verdict(200, "allowed", "u"))
    cache.put(no, Verdict(403, "forbidden"))
    cache.put(away, Verdict(503, "the cluster could not be asked"))
    assert cache.get(away) is None
    clock.now += 9.9
    assert cache.get(no).status == 403 and cache.get(ok).allowed
    clock.now += 0.2
    assert cache.get(no) is None and cache.get(ok).allowed
    clock.now += 50
    assert cache.get(ok) is None  # ask the cluster again...
    assert cache.get(no) is None and cache.stale_allowed(no) is None  # a refusal is never stretched


def test_an_expired_allowed_serves_only_while_the_cluster_cannot_be_asked_and_only_for_a_while():
    clock = Clock()
    cache = DecisionCache(clock=clock, allowed_ttl=60, stale_allowed=600)
    key = DecisionCache.key("good", "get", "/metrics")
    assert cache.stale_allowed(key) is None
    cache.put(key, Verdict(200, "allowed", "prom"))
    clock.now += 61
    assert cache.get(key) is None  # ...first
    assert cache.stale_allowed(key) == Verdict(200, "allowed", "prom")  # the API server is away
    clock.now += 600
    assert cache.get(key) is None and cache.stale_allowed(key) is None
    assert len(cache) == 0


def test_the_cache_is_keyed_by_a_digest_per_path_and_bounded():
    clock = Clock()
    cache = DecisionCache(clock=clock, max_entries=3)
    key = DecisionCache.key("secret-token", "get", "/metrics")
    assert "secret-token" not in repr(key) and key[0] == token_digest("secret-token")
    cache.put(key, Verdict(200, "allowed"))
    assert cache.get(DecisionCache.key("secret-token", "get", "/v1/services")) is None
    for i in range(3):
        cache.put(DecisionCache.key(f"ok{i}", "get", "/metrics"), Verdict(200, "allowed"))
    assert len(cache) == 3 and cache.get(key) is None  # the oldest went first


def test_junk_tokens_push_out_only_junk_and_an_unknown_token_is_unknown_on_every_path():
    clock = Clock()
    cache = DecisionCache(clock=clock, max_entries=3, max_denied=10, denied_ttl=10)
    good = DecisionCache.key("good", "get", "/metrics")
    cache.put(good, Verdict(200, "allowed", "prom"))
    for i in range(2000):
        cache.put(DecisionCache.key(f"junk{i}", "get", "/metrics"), Verdict(401, "unauthenticated"))
    assert cache.get(good).allowed and cache.known(good)
    assert len(cache) == 11  # one allowed, ten refusals
    cache.put(DecisionCache.key("junk", "get", "/metrics"), Verdict(401, "unauthenticated"))
    assert cache.get(DecisionCache.key("junk", "get", "/v1/services")).status == 401  # by the token alone
    assert cache.get(DecisionCache.key("junk", "create", "/v1/fleet/drain")).status == 401
    clock.now += 10
    assert cache.get(DecisionCache.key("junk", "get", "/metrics")) is None  # briefly
    assert not cache.known(DecisionCache.key("junk", "get", "/metrics"))


def request(path: str, local: str, authorization: str | None = None):
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (local, 9090) if name == "sockname" else default
    headers = {"Authorization": authorization} if authorization else {}
    return make_mocked_request("GET", path, headers=headers, transport=transport)


async def ok_handler(_):
    return web.Response(text="metrics")


@pytest.mark.parametrize("local,path,authorization,status", [
    ("127.0.0.1", "/metrics", None, 200),  # loopback: open
    ("198.18.0.2", "/healthz", None, 200),
    ("198.18.0.2", "/readyz", None, 200),
    ("198.18.0.2", "/metrics", None, 401),
    ("198.18.0.2", "/metrics", "Basic eA==", 401),
    ("198.18.0.2", "/metrics", "Bearer bad", 401),
    ("198.18.0.2", "/metrics", "Bearer nobody", 403),
    ("198.18.0.2", "/metrics", "Bearer good", 200),
    ("198.18.0.2", "/v1/services", "Bearer good", 403),  # allowed /metrics only
    ("198.18.0.2", "/metrics", "Bearer api-away", 503),
])
async def test_the_gate(local, path, authorization, status):
    asked = []

    async def authorize(token, verb, url, source):
        asked.append((token, verb, url))
        if token == "good" and url == "/metrics":
            return Verdict(200, "allowed", "prom")
        return {"bad": Verdict(401, "unauthenticated"), "api-away": Verdict(503, "away")}.get(
            token, Verdict(403, "forbidden"))

    response = await auth_middleware(authorize)(request(path, local, authorization), ok_handler)
    assert response.status == status
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if authorization is None or not authorization.startswith("Bearer") or local == "127.0.0.1":
        assert asked == []  # nothing to ask the cluster about


async def test_over_the_review_budget_is_429_with_retry_after_and_counted_not_logged_each_time():
    from metal_agent.adapters.refusal_log import RefusalLog

    async def authorize(token, verb, url, source):
        return Verdict(429, "too many reviews of unknown tokens from this address; retry later", retry_after=2.2)

    refusals = RefusalLog()
    gate = auth_middleware(authorize, refusals)
    for _ in range(50):
        response = await gate(request("/metrics", "198.18.0.2", "Bearer junk"), ok_handler)
        assert response.status == 429 and response.headers["Retry-After"] == "3"
    assert refusals.total == 50 and refusals.sampler.next_due() is not None  # the rest wait for the summary
    refusals.close()
