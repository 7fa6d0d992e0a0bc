"""The proxy's access hook (issue 21) with the real decision (core/access.py): allow, refuse
with an OpenAI-shaped body, and review through the agent with the cache review_outcome asks for
(allowed a minute, refused seconds, "ask again later" never)."""

from __future__ import annotations

import pytest

from metal_agent.core.access import key_digest, review_answer
from metal_agent.core.front_door import TableError, parse_table
from metal_agent.frontdoor.access import Access

KEY = "a-long-enough-api-key-0123456789"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bnM6YSJ9.c2lnbmF0dXJl"


def table(access: dict | None = None, keys: dict | None = None):
    route = {"key": "ns/a", "model": "a", "port": 1000, "upstream": "127.0.0.1:1", "state": "serving"}
    if keys is not None:
        route["access"] = keys
    doc = {"version": 1, "listen_host": "127.0.0.1", "client_port": 0, "routes": [route]}
    if access is not None:
        doc["access"] = access
    return parse_table(doc)


TABLE = table({"mode": "cluster", "networks": ["10.1.0.0/16"]}, {"digests": [key_digest(KEY)]})


class Reviewer:
    def __init__(self, *answers) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.answers = list(answers)

    async def review(self, token, key, peer):
        self.calls.append((token, key, peer))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def bearer(token: str):
    return [(b"authorization", f"Bearer {token}".encode())]


async def test_before_any_table_only_loopback_is_let_in():
    access = Access(Reviewer(review_answer(200, "ok")))
    route = TABLE.routes[0]
    assert await access.authorize(route, "127.0.0.1", []) is None
    denial = await access.authorize(route, "192.168.1.9", [])
    assert denial.status == 401 and denial.headers.get("WWW-Authenticate", "").startswith("Bearer")


async def test_networks_and_keys_from_the_table_let_callers_in_and_strangers_not():
    access = Access(Reviewer(review_answer(200, "ok")))
    access.apply(TABLE)
    route = TABLE.routes[0]
    assert await access.authorize(route, "10.1.2.3", []) is None  # a pod of the cluster
    assert await access.authorize(route, "::ffff:10.1.2.3", []) is None  # the same, IPv4-mapped
    assert await access.authorize(route, "192.168.1.9", bearer(KEY)) is None  # the service's API key
    denial = await access.authorize(route, "192.168.1.9", bearer("not-the-key-but-long-enough"))
    assert denial.status in (401, 403) and KEY not in str(denial.body)
    assert set(denial.body["error"]) == {"message", "type", "code"}


async def test_an_open_table_lets_everyone_in():
    access = Access(None)
    access.apply(table({"mode": "open"}))
    assert await access.authorize(TABLE.routes[0], "203.0.113.9", []) is None


async def test_a_token_is_reviewed_once_while_allowed_and_sends_the_peer():
    reviewer = Reviewer(review_answer(200, "ok"))
    access = Access(reviewer)
    access.apply(TABLE)
    for _ in range(3):
        assert await access.authorize(TABLE.routes[0], "192.168.1.9", bearer(JWT)) is None
    assert reviewer.calls == [(JWT, "ns/a", "192.168.1.9")]


async def test_ask_again_later_is_never_cached_so_a_flood_cannot_lock_a_client_out():
    reviewer = Reviewer(review_answer(429, "over the review budget", 3.0), review_answer(200, "ok"))
    access = Access(reviewer)
    access.apply(TABLE)
    denial = await access.authorize(TABLE.routes[0], "192.168.1.9", bearer(JWT))
    assert denial.status == 429 and denial.retry_after == 3
    assert await access.authorize(TABLE.routes[0], "192.168.1.9", bearer(JWT)) is None
    assert len(reviewer.calls) == 2


async def test_a_refused_token_is_refused_without_asking_again_for_a_while():
    reviewer = Reviewer(review_answer(403, "no RoleBinding"))
    access = Access(reviewer)
    access.apply(TABLE)
    for _ in range(2):
        denial = await access.authorize(TABLE.routes[0], "192.168.1.9", bearer(JWT))
        assert denial.status == 403 and "no RoleBinding" in denial.body["error"]["message"]
    assert len(reviewer.calls) == 1


async def test_an_unreachable_agent_is_a_503_to_retry_not_a_verdict():
    reviewer = Reviewer(ConnectionRefusedError())
    access = Access(reviewer)
    access.apply(TABLE)
    for _ in range(2):
        denial = await access.authorize(TABLE.routes[0], "192.168.1.9", bearer(JWT))
        assert denial.status == 503 and denial.retry_after
    assert len(reviewer.calls) == 2  # a failure is not cached


async def test_the_agent_reviewer_speaks_post_review_on_the_agent_socket(tmp_path):
    from aiohttp import web

    from metal_agent.frontdoor.access import AgentReviewer

    seen = []

    async def review(request):
        body = await request.json()
        seen.append(body)
        return web.json_response(review_answer(200 if body["token"] == "t1" else 403, "checked"))

    app = web.Application()
    app.router.add_post("/review", review)
    runner = web.AppRunner(app)
    await runner.setup()
    socket = tmp_path / "agent.sock"
    await web.UnixSite(runner, str(socket)).start()
    reviewer = AgentReviewer(socket)
    try:
        assert (await reviewer.review("t1", "ns/a", "10.0.0.1"))["allowed"] is True
        assert (await reviewer.review("t2", "ns/b", ""))["status"] == 403
    finally:
        await reviewer.close()
        await runner.cleanup()
    assert seen == [{"token": "t1", "key": "ns/a", "peer": "10.0.0.1"}, {"token": "t2", "key": "ns/b", "peer": ""}]


async def test_an_access_blob_that_cannot_be_read_refuses_the_table_and_keeps_the_old_state():
    access = Access(None)
    access.apply(TABLE)
    with pytest.raises(TableError, match="route 'ns/a': `access`"):
        access.apply(table({"mode": "cluster"}, {"digests": ["not-hex"]}))
    assert await access.authorize(TABLE.routes[0], "10.1.2.3", []) is None  # the old networks still hold
