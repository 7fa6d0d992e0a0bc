"""The proxy's access hook, against a stand-in for core/access.py's interface (issue 21):
allow, refuse with the module's error body, and review through the agent with a cache."""

from __future__ import annotations

import types
from dataclasses import dataclass

from metal_agent.core.front_door import parse_table
from metal_agent.frontdoor.access import Access

TABLE = parse_table({"version": 1, "listen_host": "127.0.0.1", "client_port": 0, "access": {"mode": "cluster"},
                     "routes": [{"key": "ns/a", "model": "a", "port": 1000, "upstream": "127.0.0.1:1",
                                 "state": "serving", "access": {"digests": ["k"]}}]})


def _decider():
    @dataclass(frozen=True)
    class Allow:
        how: str

    @dataclass(frozen=True)
    class Review:
        token: str

    @dataclass(frozen=True)
    class Refuse:
        status: int
        code: str
        message: str

    class AccessPolicy:
        @staticmethod
        def from_json(obj):
            return ("policy", obj.get("mode"))

    class ServiceKeys:
        @staticmethod
        def from_json(obj):
            return ("keys", tuple(obj.get("digests", ())))

    def decide(policy, keys, peer, authorization):
        assert policy == ("policy", "cluster") and keys == ("keys", ("k",))
        if peer == "127.0.0.1":
            return Allow("loopback")
        if authorization and authorization.startswith("Bearer tok"):
            return Review(authorization.removeprefix("Bearer "))
        return Refuse(401, "unauthenticated", "who are you?")

    def error_body(refusal):
        return {"error": {"message": refusal.message, "type": "authentication_error", "code": refusal.code}}

    return types.SimpleNamespace(Allow=Allow, Review=Review, Refuse=Refuse, AccessPolicy=AccessPolicy,
                                 ServiceKeys=ServiceKeys, decide=decide, error_body=error_body)


class Reviewer:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    async def review(self, token, key):
        self.calls.append((token, key))
        if self.fail:
            raise ConnectionRefusedError()
        return token == "tok-good", "no RoleBinding" if token != "tok-good" else ""


async def test_without_the_access_module_everything_is_allowed():
    access = Access(None, None)
    access.apply(TABLE)
    assert await access.authorize(TABLE.routes[0], "10.9.9.9", []) is None


async def test_allow_and_refuse_follow_the_decision():
    access = Access(_decider(), Reviewer())
    access.apply(TABLE)
    route = TABLE.routes[0]
    assert await access.authorize(route, "127.0.0.1", []) is None
    denial = await access.authorize(route, "10.9.9.9", [])
    assert denial.status == 401 and denial.body["error"]["code"] == "unauthenticated"


async def test_a_review_asks_the_agent_once_per_token_and_caches_the_answer():
    reviewer = Reviewer()
    access = Access(_decider(), reviewer)
    access.apply(TABLE)
    route = TABLE.routes[0]
    for _ in range(3):
        assert await access.authorize(route, "10.9.9.9", [(b"authorization", b"Bearer tok-good")]) is None
    denial = await access.authorize(route, "10.9.9.9", [(b"authorization", b"Bearer tok-bad")])
    assert denial.status == 403 and "no RoleBinding" in denial.body["error"]["message"]
    assert reviewer.calls == [("tok-good", "ns/a"), ("tok-bad", "ns/a")]


async def test_an_unreachable_agent_is_a_503_to_retry_not_a_verdict():
    reviewer = Reviewer(fail=True)
    access = Access(_decider(), reviewer)
    access.apply(TABLE)
    for _ in range(2):
        denial = await access.authorize(TABLE.routes[0], "10.9.9.9", [(b"authorization", b"Bearer tok-good")])
        assert denial.status == 503 and denial.retry_after
    assert len(reviewer.calls) == 2  # a failure is not cached


async def test_the_agent_reviewer_speaks_post_review_on_the_agent_socket(tmp_path):
    from aiohttp import web

    from metal_agent.frontdoor.access import AgentReviewer

    seen = []

    async def review(request):
        body = await request.json()
        seen.append(body)
        return web.json_response({"allowed": body["token"] == "t1", "reason": "checked"})

    app = web.Application()
    app.router.add_post("/review", review)
    runner = web.AppRunner(app)
    await runner.setup()
    socket = tmp_path / "agent.sock"
    await web.UnixSite(runner, str(socket)).start()
    reviewer = AgentReviewer(socket)
    try:
        assert await reviewer.review("t1", "ns/a") == (True, "checked")
        assert await reviewer.review("t2", "ns/b") == (False, "checked")
    finally:
        await reviewer.close()
        await runner.cleanup()
    assert seen == [{"token": "t1", "key": "ns/a"}, {"token": "t2", "key": "ns/b"}]


async def test_an_access_blob_the_module_cannot_read_refuses_the_table_and_keeps_the_old_state():
    import pytest

    from metal_agent.core.front_door import TableError

    decider = _decider()
    access = Access(decider, Reviewer())
    access.apply(TABLE)

    def broken(obj):
        raise ValueError("digests must be hex")

    decider.ServiceKeys.from_json = staticmethod(broken)
    with pytest.raises(TableError, match="route 'ns/a': `access`: digests must be hex"):
        access.apply(TABLE)
    assert await access.authorize(TABLE.routes[0], "127.0.0.1", []) is None  # decide() checks the old keys
