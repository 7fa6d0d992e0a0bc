"""The agent's own Unix socket (`<state>/agent.sock`, mode 0600): the front door asks it here.

`POST /review {"token", "key", "peer"}` -> `{"allowed", "reason", "status",
"retry_after"}` (core.access.review_answer): may the bearer of this token use
this InferenceService; `status` tells "refused" (401/403, cached a little)
from "ask again later" (429 over the review budget, 503 cluster away; never
cached), and `peer`, the client's address, is what the budget is kept per. The decision is the reviewer's, handed
in at build (TokenReview + SubjectAccessReview, controller/access.py); without
one every token is refused, so the front door never lets a stranger in by
default. The socket is only this user's: the front door runs as the agent's
user, nobody else may ask.

`POST /wake {"key"}` -> `{"state"}`: a request waits at the front door for a
model unloaded while idle; the agent loads it (controller/on_demand.py).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Awaitable, Callable

import structlog
from aiohttp import web

from metal_agent.core.access import review_answer

log = structlog.get_logger(__name__)

Reviewer = Callable[[str, str, str], Awaitable[dict]]  # (token, key, peer) -> review_answer(...)
Waker = Callable[[str], Awaitable[str]]  # key -> what the agent does about it ("loading", "awake", ...)
MAX_BODY = 64 * 1024


async def refuse_all(token: str, key: str, peer: str = "") -> dict:
    return review_answer(403, "token review not configured")


async def wake_none(key: str) -> str:
    return "not on demand"


def review_app(reviewer: Reviewer, waker: Waker = wake_none) -> web.Application:
    async def review(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            token, key, peer = body["token"], body["key"], body.get("peer", "")
            if (not isinstance(token, str) or not isinstance(key, str) or not isinstance(peer, str)
                    or not token or "/" not in key):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"allowed": False, "reason": "expected {\"token\": str, \"key\": \"ns/name\"}",
                                      "status": 400, "retry_after": 0.0}, status=400)
        try:
            answer = await reviewer(token, key, peer)
        except Exception as err:  # noqa: BLE001 - a failed review is "ask again later", never a crash
            log.warning("token review failed", service=key, error=f"{type(err).__name__}: {err}")
            answer = review_answer(503, "token review failed")
        return web.json_response(answer)

    async def wake(request: web.Request) -> web.Response:
        try:
            key = (await request.json())["key"]
            if not isinstance(key, str) or key.count("/") != 1:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "expected {\"key\": \"ns/name\"}"}, status=400)
        return web.json_response({"state": await waker(key)})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/review", review)
    app.router.add_post("/wake", wake)
    return app


class AgentSocket:
    def __init__(self, path: Path, reviewer: Reviewer = refuse_all, waker: Waker = wake_none) -> None:
        self.path = path
        self.runner = web.AppRunner(review_app(reviewer, waker), access_log=None)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(f"{self.path} exists and is not this user's socket; not replacing it")
            self.path.unlink()  # a previous agent's
        await self.runner.setup()
        old = os.umask(0o177)  # born 0600: no window where others could connect
        try:
            await web.UnixSite(self.runner, str(self.path)).start()
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        await self.runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
