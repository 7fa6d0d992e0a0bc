"""Issue 21, item 2 ("only those who should"): the front door's attacks, against its access decision and
the agent's sources on the real kube-apiserver (RBAC on, real ServiceAccount tokens).

Each attack is one test, named for what the attacker tries:

- a stranger on the LAN with no credential, a made-up key, or a borrowed header trick;
- a forged token: a real ServiceAccount token's claims re-signed with the attacker's key, or a real
  token with its payload edited, or an unsigned (`alg: none`) one;
- the key of another service, or a token allowed on another service;
- an InferenceService annotation that tries to read another namespace's Secret;
- a flood of junk tokens (the budget; the agent-level flood is tests/integration/test_front_door_access.py).

The front door process (fd-proxy) calls exactly these: `core.access.decide` per request, and the
agent's `AccessSource.review` when it says Review.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from kubernetes_asyncio import client

from metal_agent.adapters.kube.api_keys import ANNOTATION, ApiKeys
from metal_agent.controller.access import AccessSource
from metal_agent.core.access import AccessMode, AccessPolicy, AccessSettings, Allow, Refuse, Review, ServiceKeys, decide
from tests.support.kube import create_namespace, delete_namespace, service_account_token
from tests.support.front_door_grants import grant_client
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CLUSTER = AccessPolicy(AccessMode.CLUSTER, ("10.244.0.0/16", "192.168.1.10/32"))
CHAT_KEY = "chat-key-" + "c" * 32
CODE_KEY = "code-key-" + "d" * 32
LAN = "192.168.1.77"  # a laptop on the Mac's Wi-Fi


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def resign(token: str, key: rsa.RSAPrivateKey, **claims) -> str:
    """`token`'s header and claims (changed by `claims`), signed RS256 with someone else's key."""
    head, payload, _ = token.split(".")
    body = {**json.loads(_unb64(payload)), **claims}
    signing_input = f"{head}.{_b64(json.dumps(body).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"




@pytest.fixture
async def source(agent_api):
    frozen = 1000.0
    return AccessSource(agent_api, AccessSettings(), {}, clock=lambda: frozen)


# -- a stranger on the LAN ---------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [
    None, "", "Basic YWRtaW46YWRtaW4=", "Bearer ", "Bearer sk-no-such-key-000000000000",
    "Bearer " + CHAT_KEY[:-1], "Bearer " + CHAT_KEY + "x", "Bearer " + CHAT_KEY.upper(),
])
def test_a_stranger_on_the_lan_is_refused(authorization):
    keys = ServiceKeys.of([CHAT_KEY])
    result = decide(CLUSTER, keys, LAN, authorization)
    assert isinstance(result, Refuse) and result.status in (401, 403), authorization


@pytest.mark.parametrize("peer", ["192.168.1.77", "::ffff:192.168.1.77", "192.168.1.10.evil", "10.244.0.1:80",
                                  "10.244.0.1, 192.168.1.77", "localhost", "127.0.0.1 ", "[::1]", "fe80::1%lo0"])
def test_a_stranger_cannot_pass_for_the_cluster_or_loopback_by_the_shape_of_its_address(peer):
    """The peer is the socket's, never a header; a malformed one is nobody's (a credential is needed)."""
    assert decide(CLUSTER, ServiceKeys(), peer, None).status == 401


def test_open_mode_is_the_only_way_a_stranger_gets_in_without_a_credential():
    assert decide(AccessPolicy(AccessMode.OPEN), ServiceKeys(), LAN, None) == Allow("open")
    assert decide(AccessPolicy(AccessMode.CLUSTER), ServiceKeys(), LAN, None).status == 401


# -- forged tokens -----------------------------------------------------------------------------------

async def test_a_forged_token_is_refused_by_the_cluster(admin_api, namespace, source):
    await grant_client(admin_api, namespace, "chat")
    real = await service_account_token(admin_api, namespace, "chat-client")
    service = f"{namespace}/chat"
    assert (await source.review(real, service, LAN))[0]  # the real one works...

    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    resigned = resign(real, attacker)  # same claims, the attacker's signature
    head, payload, signature = real.split(".")
    edited_claims = json.loads(_unb64(payload))
    edited_claims["sub"] = f"system:serviceaccount:{namespace}:admin"
    edited = f"{head}.{_b64(json.dumps(edited_claims).encode())}.{signature}"  # the real signature, other claims
    for forged in (resigned, edited):
        assert decide(CLUSTER, ServiceKeys(), LAN, f"Bearer {forged}") == Review(forged)
        found = await source.verdict(forged, service, LAN)
        assert found.status == 401 and forged not in found.reason, found


async def test_an_unsigned_token_is_not_even_sent_for_review(admin_api, namespace, source):
    real = await service_account_token(admin_api, namespace, "nobody", create=True)
    _, payload, _ = real.split(".")
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}."
    assert isinstance(decide(CLUSTER, ServiceKeys(), LAN, f"Bearer {unsigned}"), Refuse)
    unsigned_sig = f"{_b64(json.dumps({'alg': 'none'}).encode())}.{payload}.AAAA"
    assert isinstance(decide(CLUSTER, ServiceKeys(), LAN, f"Bearer {unsigned_sig}"), Refuse)
    assert source.authorizer.reviews == 0


# -- another service's credentials ---------------------------------------------------------------------

def test_the_key_of_another_service_is_refused():
    chat, code = ServiceKeys.of([CHAT_KEY]), ServiceKeys.of([CODE_KEY])
    assert decide(CLUSTER, chat, LAN, f"Bearer {CHAT_KEY}") == Allow("api-key")
    assert decide(CLUSTER, code, LAN, f"Bearer {CHAT_KEY}").status == 403
    assert decide(CLUSTER, ServiceKeys(), LAN, f"Bearer {CHAT_KEY}").status == 403


async def test_a_token_allowed_on_one_service_is_refused_on_another(admin_api, namespace, source):
    await grant_client(admin_api, namespace, "chat")
    token = await service_account_token(admin_api, namespace, "chat-client")
    assert (await source.review(token, f"{namespace}/chat", LAN))[0]
    for other in (f"{namespace}/code", f"{namespace}/chat-2", "default/chat", f"{namespace}/chat/x"):
        allowed, reason = await source.review(token, other, LAN)
        assert not allowed and token not in reason, other


async def test_an_annotation_cannot_reach_another_namespaces_secret(admin_api, agent_api, namespace):
    """The victim's namespace holds Secret `keys`, and the agent may even read it there; an
    InferenceService elsewhere names `<victim-ns>/keys`: that reads as Secret `<victim-ns>`, key
    `keys`, in the attacker's own namespace, so the victim's key never becomes the attacker's."""
    victim = await create_namespace(admin_api, prefix="victim")
    try:
        core = client.CoreV1Api(admin_api)
        await core.create_namespaced_secret(victim, {"metadata": {"name": "keys"}, "data": {
            "api-key": base64.b64encode(CHAT_KEY.encode()).decode(),
            "keys": base64.b64encode(CHAT_KEY.encode()).decode()}})
        rbac = client.RbacAuthorizationV1Api(admin_api)
        for ns in (victim, namespace):
            await rbac.create_namespaced_role(ns, {"metadata": {"name": "read-keys"}, "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]})
            await rbac.create_namespaced_role_binding(ns, {"metadata": {"name": "read-keys"}, "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-keys"}, "subjects": [
                {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "metal-agent"}]})
        keys = ApiKeys(agent_api, forbidden_retry=3600.0)
        task = asyncio.ensure_future(keys.run())
        try:
            attempts = [f"{victim}/keys", f"{victim}/keys/api-key", f"../{victim}/keys", f"/{victim}/keys",
                        f"{victim}%2Fkeys", f"keys.{victim}", "KEYS", f"{victim}/keys/../api-key"]
            for number, value in enumerate(attempts):
                keys.update(f"{namespace}/svc-{number}", {ANNOTATION: value})
            for number, value in enumerate(attempts):
                problem = await wait_for(lambda n=number: keys.problem(f"{namespace}/svc-{n}"), timeout=30,
                                         what=f"{value!r} judged")
                assert keys.keys(f"{namespace}/svc-{number}") == ServiceKeys(), value
                assert problem.reason in ("ApiKeySecretInvalid", "ApiKeySecretNotFound"), (value, problem)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await delete_namespace(admin_api, victim)
