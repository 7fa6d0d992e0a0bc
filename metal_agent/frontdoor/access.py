"""Who may use a route: the per-request `authorize(route, peer, headers)` hook.

The decision is pure and lives in `metal_agent.core.access`
(`decide(policy, keys, peer, authorization) -> Allow | Review | Refuse`); the
policy and each service's key digests arrive in the table the agent pushes.
This module only feeds it and carries out its answer: `Review` asks the agent
(`POST /review` on `<state>/agent.sock`). Answers are cached by the token's
sha256 as `core.access.review_outcome` says: an allowed token for a minute (a
busy client costs one review a minute, not one a request), a refused one for
seconds (a new RoleBinding takes effect soon), and "ask again later" (over the
review budget, cluster away, agent restarting) never, so a flood of junk
tokens cannot lock a real client out.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from metal_agent.core.access import (AccessPolicy, Allow, Refuse, ServiceKeys, challenge, decide, error_body,
                                     review_outcome)
from metal_agent.core.front_door import Route, Table, TableError

REVIEW_CACHE_MAX = 4096
AGENT_AWAY_RETRY_S = 2


@dataclass(frozen=True)
class Denial:
    status: int
    body: dict[str, Any]
    retry_after: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Reviewer(Protocol):
    async def review(self, token: str, key: str, peer: str) -> dict: ...


def _denial(refusal: Refuse, retry_after: float = 0.0) -> Denial:
    return Denial(refusal.status, error_body(refusal), max(1, round(retry_after)) if retry_after else None,
                  challenge(refusal))


class Access:
    """The hook the proxy calls after routing and before queueing."""

    def __init__(self, reviewer: Reviewer | None) -> None:
        self._reviewer = reviewer
        # No table yet: the secure default (loopback only), never "open".
        self._policy = AccessPolicy.from_json({})
        self._keys: dict[str, ServiceKeys] = {}
        self._cache: dict[tuple[str, str], tuple[float, Refuse | None]] = {}

    def apply(self, table: Table) -> None:
        """Parse the table's access blobs once per table, not once per request. A blob that
        cannot be read refuses the whole table (TableError), before anything is persisted or
        applied, like any other bad field."""
        where = "table `access`"
        try:
            policy = AccessPolicy.from_json(table.access or {})
            keys = {}
            for r in table.routes:
                where = f"route {r.key!r}: `access`"
                keys[r.key] = ServiceKeys.from_json(r.access or {})
        except (ValueError, TypeError) as err:
            raise TableError(f"{where}: {err}") from err
        self._policy, self._keys = policy, keys

    async def authorize(self, route: Route, peer: str, headers: Mapping[bytes, bytes] | list) -> Denial | None:
        verdict = decide(self._policy, self._keys.get(route.key) or ServiceKeys(), peer,
                         _header(headers, b"authorization"))
        if isinstance(verdict, Allow):
            return None
        if isinstance(verdict, Refuse):
            return _denial(verdict)
        return await self._review(verdict.token, route.key, peer)

    async def _review(self, token: str, key: str, peer: str) -> Denial | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get((digest, key))
        if cached is not None and cached[0] >= now:
            return _denial(cached[1]) if cached[1] is not None else None
        if self._reviewer is None:
            return _denial(Refuse(401, "invalid_token", "tokens cannot be reviewed here"))
        try:
            answer = await self._reviewer.review(token, key, peer)
        except Exception as err:  # noqa: BLE001 - the agent is down or restarting: ask again soon
            return _denial(Refuse(503, "review_unavailable",
                                  f"the token could not be reviewed now: {type(err).__name__}"), AGENT_AWAY_RETRY_S)
        refusal, ttl, retry_after = review_outcome(answer)
        if ttl > 0:
            self._remember((digest, key), now + ttl, refusal, now)
        return _denial(refusal, retry_after) if refusal is not None else None

    def _remember(self, entry: tuple[str, str], until: float, refusal: Refuse | None, now: float) -> None:
        if len(self._cache) >= REVIEW_CACHE_MAX:
            self._cache = {k: v for k, v in self._cache.items() if v[0] >= now}
            if len(self._cache) >= REVIEW_CACHE_MAX:
                self._cache.clear()
        self._cache[entry] = (until, refusal)


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class AgentReviewer:
    """`POST /review {"token", "key", "peer"}` on the agent's Unix socket -> its review answer."""

    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self._socket_path = socket_path
        self._timeout = timeout
        self._session: Any = None

    async def review(self, token: str, key: str, peer: str) -> dict:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self._socket_path)),
                timeout=aiohttp.ClientTimeout(total=self._timeout))
        async with self._session.post("http://agent/review",
                                      json={"token": token, "key": key, "peer": peer}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"agent answered {resp.status}")
            answer = json.loads(await resp.read())
        if not isinstance(answer, dict):
            raise RuntimeError("agent answered something other than an object")
        return answer

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
