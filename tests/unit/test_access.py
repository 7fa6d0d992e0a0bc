"""The front door's access decision (core/access.py): every rule, its order, and hostile input."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time

import pytest

from metal_agent.core.access import (
    MAX_CREDENTIAL,
    MAX_KEYS,
    AccessMode,
    AccessPolicy,
    Allow,
    Refuse,
    Review,
    ServiceKeys,
    bearer,
    challenge,
    decide,
    error_body,
    key_digest,
    looks_like_jwt,
    review_answer,
    review_outcome,
    review_refusal,
)

CLUSTER = AccessPolicy(AccessMode.CLUSTER, ("10.244.0.0/16", "192.168.1.10/32", "fd00:10::/64"))
KEY = "sk-" + "a" * 40
KEYS = ServiceKeys.of([KEY])
STRANGER = "203.0.113.7"


def jwt(header: dict | None = None) -> str:
    head = base64.urlsafe_b64encode(json.dumps(header or {"alg": "RS256", "kid": "x"}).encode()).rstrip(b"=").decode()
    return f"{head}.{secrets.token_urlsafe(96)}.{secrets.token_urlsafe(64)}"


# -- the order of the rules --------------------------------------------------------------------------

def test_open_mode_allows_everyone_even_without_or_with_a_bad_credential():
    policy = AccessPolicy(AccessMode.OPEN)
    for auth in (None, "", "Basic Zm9v", "Bearer wrong"):
        assert decide(policy, KEYS, STRANGER, auth) == Allow("open")


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_allowed_with_no_credential(peer):
    assert decide(CLUSTER, KEYS, peer, None) == Allow("loopback")


@pytest.mark.parametrize("peer", ["10.244.3.9", "192.168.1.10", "::ffff:10.244.0.1", "::ffff:192.168.1.10",
                                  "fd00:10::abcd", "fd00:10::1%en0"])
def test_peers_in_a_listed_network_are_allowed(peer):
    assert decide(CLUSTER, KEYS, peer, None) == Allow("network")


@pytest.mark.parametrize("peer", ["192.168.1.11", "10.245.0.1", "fd00:11::1", "::ffff:192.168.1.11", STRANGER,
                                  "", None, "not-an-ip", "10.244.3.9:1234", "0.0.0.0", "::"])
def test_everyone_else_needs_a_credential(peer):
    assert decide(CLUSTER, KEYS, peer, None).status == 401


def test_a_network_peer_is_allowed_whatever_credential_it_sends():
    assert decide(CLUSTER, KEYS, "10.244.1.1", "Bearer wrong") == Allow("network")


def test_the_services_api_key_is_allowed_and_another_services_is_refused():
    other = ServiceKeys.of(["sk-other"])
    assert decide(CLUSTER, KEYS, STRANGER, f"Bearer {KEY}") == Allow("api-key")
    assert decide(CLUSTER, KEYS, STRANGER, f"bearer   {KEY}  ") == Allow("api-key")
    refused = decide(CLUSTER, other, STRANGER, f"Bearer {KEY}")
    assert isinstance(refused, Refuse) and refused.status == 403


def test_a_jwt_is_sent_for_review_and_a_key_that_matches_is_not():
    token = jwt()
    assert decide(CLUSTER, KEYS, STRANGER, f"Bearer {token}") == Review(token)
    assert decide(CLUSTER, ServiceKeys(), STRANGER, f"Bearer {token}") == Review(token)
    assert decide(CLUSTER, ServiceKeys.of([token]), STRANGER, f"Bearer {token}") == Allow("api-key")


def test_a_service_without_keys_refuses_every_non_token_bearer():
    for credential in ("", "x", KEY, "a" * 64, key_digest(KEY)):
        result = decide(CLUSTER, ServiceKeys(), STRANGER, f"Bearer {credential}")
        assert isinstance(result, Refuse), credential


def test_the_digest_itself_is_not_a_key():
    assert decide(CLUSTER, KEYS, STRANGER, f"Bearer {key_digest(KEY)}").status == 403


# -- the refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("auth,status", [
    (None, 401), ("", 401), ("   ", 401), ("Basic dXNlcjpwYXNz", 401), ("Bearer", 401), ("Bearer ", 401),
    ("Bearer a b", 401), ("Digest username=x", 401), ("Token abc", 401), (KEY, 401), ("Bearer\tabc", 401),
    ("Bearer wrong-key", 403), ("Bearer a.b.c", 403), ("Bearer eyJ.e30.x", 403),
])
def test_no_usable_credential_is_401_a_refused_one_403(auth, status):
    result = decide(CLUSTER, KEYS, STRANGER, auth)
    assert isinstance(result, Refuse) and result.status == status, (auth, result)


def test_refusals_are_openai_shaped_and_never_echo_the_credential():
    secret = "sk-secret-" + secrets.token_hex(16)
    for auth in (f"Bearer {secret}", f"Basic {secret}", secret, f"Bearer {secret}.{secret}.{secret}",
                 f"Bearer {'x' * (MAX_CREDENTIAL + 100)}{secret}"):
        refusal = decide(CLUSTER, KEYS, STRANGER, auth)
        body = error_body(refusal)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}
        assert secret not in json.dumps(body) and secret not in repr(refusal)
        assert body["error"]["type"] in ("authentication_error", "permission_error")
    assert challenge(decide(CLUSTER, KEYS, STRANGER, None)) == {"WWW-Authenticate": 'Bearer realm="metal-agent"'}
    assert challenge(decide(CLUSTER, KEYS, STRANGER, "Bearer nope")) == {}


def test_a_review_refusal_says_the_agents_reason_bounded():
    refusal = review_refusal("forbidden: x may not get inferenceservices/proxy" + "!" * 1000)
    assert refusal.status == 403 and len(refusal.message) <= 300
    assert error_body(refusal)["error"]["code"] == "token_refused"
    assert [review_refusal("r", s).status for s in (401, 403, 429, 503, 200, 500)] == [401, 403, 429, 503, 403, 403]
    assert error_body(review_refusal("r", 429))["error"]["type"] == "rate_limit_error"


# -- hostile input -----------------------------------------------------------------------------------

def test_huge_credentials_are_refused_cheaply():
    huge = "Bearer " + "A" * (MAX_CREDENTIAL * 64)
    started = time.perf_counter()
    result = decide(CLUSTER, KEYS, STRANGER, huge)
    assert isinstance(result, Refuse) and result.status == 403
    assert time.perf_counter() - started < 0.05
    huge_jwt = "Bearer " + jwt() + "A" * (MAX_CREDENTIAL * 4)
    assert isinstance(decide(CLUSTER, KEYS, STRANGER, huge_jwt), Refuse)


@pytest.mark.parametrize("token", [
    "a.b.c", "....", "eyJ.eyJ.eyJ", jwt({"alg": "none"}), jwt({"alg": ""}), jwt({"typ": "JWT"}),
    jwt({"alg": 5}), "e30.e30.e30",  # {} header
    base64.urlsafe_b64encode(b"[1,2]").decode().rstrip("=") + ".x.y",
    base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("=") + ".x.y",
    jwt().replace(".", "..", 1), jwt() + ".", "." + jwt(), jwt() + "=", jwt().replace("-", "+") + "+/",
    "eyJhbGciOiJSUzI1NiJ9..", "eyJhbGciOiJSUzI1NiJ9.x.y.z",
    "eyJ" + "A" * 5000 + ".x.y",
])
def test_things_that_are_not_jwts_are_not_reviewed(token):
    assert not looks_like_jwt(token)
    assert not isinstance(decide(CLUSTER, KEYS, STRANGER, f"Bearer {token}"), Review)


def test_service_account_shaped_tokens_are_reviewed():
    assert looks_like_jwt(jwt())
    assert looks_like_jwt("eyJhbGciOiJSUzI1NiJ9." + "a" * 10 + ".b")  # the flood tests' junk
    assert looks_like_jwt(jwt({"alg": "ES256", "typ": "JWT"}))


@pytest.mark.parametrize("auth", [
    "Bearer \x00abc", "Bearer abc\r\nX-Injected: 1", "Bearer \u202eabc", "BEARER " + KEY, "Bearer\u00a0" + KEY,
    "Bearer " + KEY + "\x00", "Bearer " + "\udcff" * 3,
])
def test_odd_bytes_never_crash_and_never_match_by_accident(auth):
    result = decide(CLUSTER, KEYS, STRANGER, auth)
    if auth == "BEARER " + KEY:
        assert result == Allow("api-key")  # the scheme is case-insensitive (RFC 7235)
    else:
        assert isinstance(result, Refuse)


def test_many_keys_all_work_and_cost_little():
    keys = [f"k-{i}-{secrets.token_hex(8)}" for i in range(MAX_KEYS)]
    many = ServiceKeys.of(keys)
    assert len(many.digests) == MAX_KEYS
    for key in (keys[0], keys[-1], keys[MAX_KEYS // 2]):
        assert decide(CLUSTER, many, STRANGER, f"Bearer {key}") == Allow("api-key")
    started = time.perf_counter()
    for _ in range(100):
        decide(CLUSTER, many, STRANGER, "Bearer not-a-key")
    assert (time.perf_counter() - started) / 100 < 0.005
    with pytest.raises(ValueError):
        ServiceKeys.of(keys + ["one-too-many"])


def test_many_networks_are_looked_up_without_a_scan():
    nodes = [f"10.{i // 250}.{i % 250}.{7}/32" for i in range(5000)]
    pods = [f"172.{16 + i // 250}.{i % 250}.0/24" for i in range(5000)]
    policy = AccessPolicy(AccessMode.CLUSTER, tuple(nodes + pods))
    assert decide(policy, KEYS, "10.19.249.7", None) == Allow("network")
    assert decide(policy, KEYS, "172.35.249.200", None) == Allow("network")
    assert decide(policy, KEYS, "10.19.249.8", None).status == 401
    started = time.perf_counter()
    for _ in range(1000):
        decide(policy, KEYS, STRANGER, f"Bearer {KEY}")
    assert (time.perf_counter() - started) / 1000 < 0.001


# -- values and JSON ----------------------------------------------------------------------------------

def test_policy_normalises_networks_and_round_trips():
    policy = AccessPolicy(AccessMode("cluster"), ("192.168.1.77/24", "10.0.0.1", "10.0.0.1/32", "::ffff:10.9.0.0/112",
                                                   "2001:db8::1/64"))
    assert policy.networks == ("10.0.0.1/32", "10.9.0.0/16", "192.168.1.0/24", "2001:db8::/64")
    assert AccessPolicy.from_json(json.loads(json.dumps(policy.to_json()))) == policy
    assert policy.to_json() == {"mode": "cluster", "networks": list(policy.networks)}
    assert AccessPolicy.from_json({"mode": "open"}) == AccessPolicy(AccessMode.OPEN)
    assert AccessPolicy.from_json({}) == AccessPolicy(AccessMode.CLUSTER)  # nothing said: closed, not open


@pytest.mark.parametrize("data", [
    None, [], "cluster", {"mode": "closed"}, {"mode": None}, {"mode": "cluster", "networks": "10.0.0.0/8"},
    {"mode": "cluster", "networks": ["10.0.0.0/33"]}, {"mode": "cluster", "networks": ["example.com"]},
    {"mode": "cluster", "networks": [5]}, {"mode": "cluster", "networks": ["10.0.0.0/8"] * 70000},
])
def test_bad_policies_are_refused_clearly(data):
    with pytest.raises(ValueError):
        AccessPolicy.from_json(data)


def test_keys_hold_digests_only_and_round_trip():
    keys = ServiceKeys.of(["one", "two", "one"])
    assert keys.digests == tuple(sorted({hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()}))
    assert "one" not in json.dumps(keys.to_json())
    assert ServiceKeys.from_json(json.loads(json.dumps(keys.to_json()))) == keys
    assert ServiceKeys.from_json(None) == ServiceKeys() == ServiceKeys.from_json({"digests": []})
    assert ServiceKeys((keys.digests[0].upper(),)).digests == (keys.digests[0],)


@pytest.mark.parametrize("data", [[], "x", {"digests": "abc"}, {"digests": ["abc"]}, {"digests": [None]},
                                  {"digests": ["g" * 64]}, {"digests": ["a" * 65]}])
def test_bad_keys_are_refused_without_echoing_them(data):
    with pytest.raises(ValueError) as err:
        ServiceKeys.from_json(data)
    assert "gggg" not in str(err.value) and "aaaa" not in str(err.value)


@pytest.mark.parametrize("header,credential", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("  Bearer   abc  ", "abc"), ("Bearer a b", None),
    ("Basic abc", None), (None, None), ("", None), ("Bearer", None),
])
def test_bearer(header, credential):
    assert bearer(header) == credential


# -- the /review answer -------------------------------------------------------------------------------

def test_review_answers_say_what_may_be_cached():
    assert review_outcome(review_answer(200, "allowed")) == (None, 60.0, 0.0)
    refused, ttl, _ = review_outcome(review_answer(403, "forbidden: x may not get"))
    assert refused.status == 403 and ttl == 10.0
    unknown, ttl, _ = review_outcome(review_answer(401, "unauthenticated"))
    assert unknown.status == 401 and ttl == 10.0
    for status in (429, 503):
        refused, ttl, retry = review_outcome(review_answer(status, "later", 2.5))
        assert refused.status == status and ttl == 0.0 and retry == 2.5  # never cached: ask again
    assert review_outcome(review_answer(429, "later", 0.0))[2] == 1.0


@pytest.mark.parametrize("answer,status", [
    ({"allowed": True, "reason": "ok"}, None), ({"allowed": False, "reason": "no"}, 403), ({}, 403),
    ({"allowed": "yes"}, 403), ({"allowed": True, "status": 403}, 403), ({"allowed": False, "status": True}, 403),
    ({"allowed": False, "status": 999}, 403), ({"allowed": False, "status": 429, "retry_after": "soon"}, 429),
    ({"allowed": False, "status": 429, "retry_after": 1e12}, 429), ({"allowed": False, "reason": "x" * 5000}, 403),
])
def test_odd_or_older_answers_are_read_safely(answer, status):
    refusal, ttl, retry = review_outcome(answer)
    assert (refusal.status if refusal else None) == status
    assert 0 <= ttl <= 60 and 0 <= retry <= 3600
    if refusal:
        assert len(refusal.message) <= 300
