"""Who may use a route: the per-request `authorize(route, peer, headers)` hook.

The decision itself is pure and lives in `metal_agent.core.access` (owned by the
fd-access work: `decide(policy, keys, peer, authorization) -> Allow | Review | Refuse`).
This module only feeds it and carries out its answer: `Review` asks the agent
(`POST /review` on `<state>/agent.sock`), whose answer is cached by the token's
sha256 for a minute so a busy client costs one review a minute, not one a request.

Until `core/access.py` is merged, `load_decider()` finds no module and the hook
allows every request (the Go agent's behaviour); see the fd-proxy notes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Protocol

from metal_agent.core.front_door import Route, Table, TableError

REVIEW_TTL_S = 60.0
REVIEW_CACHE_MAX = 4096


@dataclass(frozen=True)
class Denial:
    status: int
    body: dict[str, Any]
    retry_after: int | None = None


class Reviewer(Protocol):
    async def review(self, token: str, key: str) -> tuple[bool, str]: ...


def load_decider() -> ModuleType | None:
    """`metal_agent.core.access` when it is installed, else None (allow everything)."""
    try:
        return importlib.import_module("metal_agent.core.access")
    except ModuleNotFoundError:
        return None


def _error(status: int, code: str, message: str) -> dict[str, Any]:
    kind = "authentication_error" if status == 401 else (
        "permission_error" if status == 403 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code}}


class Access:
    """The hook the proxy calls after routing and before queueing."""

    def __init__(self, decider: ModuleType | None, reviewer: Reviewer | None) -> None:
        self._decider = decider
        self._reviewer = reviewer
        self._policy: Any = None
        self._keys: dict[str, Any] = {}
        self._cache: dict[tuple[str, str], tuple[float, bool, str]] = {}

    def apply(self, table: Table) -> None:
        """Parse the table's opaque access blobs once per table, not once per request.

        A blob the access module cannot read refuses the whole table (TableError), before
        anything is persisted or applied, like any other bad field.
        """
        if self._decider is None:
            return
        mod = self._decider
        where = "table `access`"
        try:
            policy = mod.AccessPolicy.from_json(table.access or {})
            keys = {}
            for r in table.routes:
                where = f"route {r.key!r}: `access`"
                keys[r.key] = mod.ServiceKeys.from_json(r.access or {})
        except Exception as err:
            raise TableError(f"{where}: {err}") from err
        self._policy, self._keys = policy, keys

    async def authorize(self, route: Route, peer: str, headers: Mapping[bytes, bytes] | list) -> Denial | None:
        if self._decider is None:
            return None  # TODO(fd-access merge): core/access.py absent: allow, like the Go agent
        mod = self._decider
        authorization = _header(headers, b"authorization")
        verdict = mod.decide(self._policy, self._keys.get(route.key) or mod.ServiceKeys.from_json({}),
                             peer, authorization)
        if isinstance(verdict, mod.Allow):
            return None
        if isinstance(verdict, mod.Refuse):
            return Denial(verdict.status, mod.error_body(verdict))
        return await self._review(verdict.token, route.key)

    async def _review(self, token: str, key: str) -> Denial | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get((digest, key))
        if cached is None or cached[0] < now:
            if self._reviewer is None:
                return Denial(401, _error(401, "invalid_token", "tokens cannot be reviewed here"))
            try:
                allowed, reason = await self._reviewer.review(token, key)
            except Exception as err:  # the agent is down or restarting: ask again soon
                return Denial(503, _error(503, "review_unavailable",
                                          f"the token could not be reviewed now: {type(err).__name__}"), 2)
            if len(self._cache) >= REVIEW_CACHE_MAX:
                self._cache = {k: v for k, v in self._cache.items() if v[0] >= now}
                if len(self._cache) >= REVIEW_CACHE_MAX:
                    self._cache.clear()
            cached = self._cache[(digest, key)] = (now + REVIEW_TTL_S, allowed, reason)
        if cached[1]:
            return None
        return Denial(403, _error(403, "forbidden", f"the token may not use {key}: {cached[2]}"))


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class AgentReviewer:
    """`POST /review {"token", "key"}` on the agent's Unix socket -> `{"allowed", "reason"}`."""

    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self._socket_path = socket_path
        self._timeout = timeout
        self._session: Any = None

    async def review(self, token: str, key: str) -> tuple[bool, str]:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self._socket_path)),
                timeout=aiohttp.ClientTimeout(total=self._timeout))
        async with self._session.post("http://agent/review", json={"token": token, "key": key}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"agent answered {resp.status}")
            answer = json.loads(await resp.read())
        return bool(answer.get("allowed")), str(answer.get("reason", ""))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
