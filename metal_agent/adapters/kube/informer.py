"""List+watch a custom resource into a local cache, and say what changed.

LLMKube's agent lists every 5 s; we list once, then watch from that
resourceVersion and react within milliseconds. The cache is the only source
the reconciler reads, which gives three guarantees:

- A failed request never looks like a delete: the cache only loses an object
  on a DELETED event or when a *successful* relist no longer contains it.
- `410 Gone` (our resourceVersion was compacted away) relists and diffs the
  result against the cache, so the reconciler sees only real changes.
- Bookmarks keep our resourceVersion fresh while nothing changes, so a
  reconnect after a quiet hour resumes instead of relisting.

Connection failures back off with jitter; `consecutive_failures` and
`unreachable_since` let the composition root decide when to give up.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import aiohttp
import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = structlog.get_logger(__name__)

# (old, new): (None, obj) added, (obj, obj') modified, (obj, None) deleted, (obj, obj) resync.
OnChange = Callable[[dict | None, dict | None], None]


@dataclass(frozen=True)
class CustomResource:
    group: str
    version: str
    plural: str


class _Gone(Exception):
    """Our resourceVersion is too old: relist."""


def _slim(obj: dict) -> dict:
    """Keep only the status entries of managedFields.

    managedFields is server-side-apply bookkeeping, often the bulk of an
    object; dropping it keeps the cache of a namespace with hundreds of
    InferenceServices small. The status entries are small and are how the
    agent tells who else writes status, and whether the server already holds
    the status fields it means to apply.
    """
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        kept = [e for e in meta.pop("managedFields") or [] if isinstance(e, dict) and e.get("subresource") == "status"]
        if kept:
            meta["managedFields"] = kept
    return obj


def object_key(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _rv(obj: dict | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


class Informer:
    def __init__(
        self,
        api: client.ApiClient,
        resource: CustomResource,
        on_change: OnChange,
        *,
        namespaces: Iterable[str] | None = None,  # None: all namespaces
        watch_timeout: float = 300.0,
        resync_period: float = 600.0,
        max_backoff: float = 30.0,
        on_failure: Callable[[int], None] | None = None,
        on_relist: Callable[[str], None] | None = None,
        synced: asyncio.Event | None = None,
        cache: dict[str, dict] | None = None,
    ) -> None:
        """`cache`: the store to fill, when whoever handles `on_change` must read it and so
        is built before the informer (the agent's intake); None: a store of its own."""
        self.api = client.CustomObjectsApi(api)
        self.resource = resource
        self.on_change = on_change
        self.scopes: tuple[str | None, ...] = tuple(namespaces) if namespaces else (None,)
        self.watch_timeout = watch_timeout
        self.resync_period = resync_period
        self.max_backoff = max_backoff
        self.on_failure = on_failure
        self.on_relist = on_relist  # called with "initial" or "expired" (410 Gone) before each list
        self.cache: dict[str, dict] = {} if cache is None else cache
        self.consecutive_failures = 0
        self.unreachable_since: float | None = None
        self._synced_scopes: set[str | None] = set()
        self._resume: dict[str | None, str | None] = {}  # per scope: the resourceVersion to watch from
        self.synced = synced if synced is not None else asyncio.Event()  # given: a part built first waits on it
        self._log = log.bind(resource=resource.plural)

    def get(self, key: str) -> dict | None:
        return self.cache.get(key)

    def items(self) -> list[dict]:
        return list(self.cache.values())

    async def run(self) -> None:
        """Run until cancelled: one list+watch loop per namespace scope, plus resync."""
        async with asyncio.TaskGroup() as tasks:
            for scope in self.scopes:
                tasks.create_task(self._run_scope(scope), name=f"watch {self.resource.plural} {scope or '*'}")
            tasks.create_task(self._resync_loop())

    # -- list and watch ---------------------------------------------------

    def _in_scope(self, key: str, scope: str | None) -> bool:
        return scope is None or key.startswith(f"{scope}/")

    async def _list(self, scope: str | None) -> dict:
        r = self.resource
        if scope is None:
            return await self.api.list_cluster_custom_object(r.group, r.version, r.plural)
        return await self.api.list_namespaced_custom_object(r.group, r.version, scope, r.plural)

    async def _relist(self, scope: str | None) -> str:
        listing = await self._list(scope)
        fresh = {object_key(item): _slim(item) for item in listing.get("items") or []}
        for key, item in fresh.items():
            kind = listing.get("kind", "").removesuffix("List")
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", listing.get("apiVersion"))
        gone = [k for k in self.cache if self._in_scope(k, scope) and k not in fresh]
        for key in gone:
            self.on_change(self.cache.pop(key), None)
        for key, item in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = item
            if old is None or _rv(old) != _rv(item):
                self.on_change(old, item)
        self._synced_scopes.add(scope)
        if len(self._synced_scopes) == len(self.scopes):
            self.synced.set()
        return listing["metadata"]["resourceVersion"]

    async def _watch(self, scope: str | None, rv: str) -> str:
        r = self.resource
        timeout = int(self.watch_timeout * random.uniform(0.8, 1.2))
        kwargs = dict(
            watch=True, allow_watch_bookmarks=True, resource_version=rv, timeout_seconds=timeout,
            _preload_content=False, _request_timeout=timeout + 30,
        )
        if scope is None:
            resp = await self.api.list_cluster_custom_object(r.group, r.version, r.plural, **kwargs)
        else:
            resp = await self.api.list_namespaced_custom_object(r.group, r.version, scope, r.plural, **kwargs)
        async with resp:
            self._reachable()
            buffer = b""
            # Split lines ourselves: aiohttp's readline caps a line at 64 KiB,
            # and objects with large annotations or managedFields exceed that.
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        # Kept on the informer at once: a stream that breaks mid-way resumes
                        # from the last event applied, not from where it started (a replay
                        # would take the cache back in time: old specs, deleted objects).
                        rv = self._resume[scope] = self._apply_event(json.loads(line)) or rv
        return rv

    def _apply_event(self, event: dict) -> str | None:
        kind, obj = event.get("type"), _slim(event.get("object") or {})
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
        if kind == "BOOKMARK":
            return _rv(obj)
        key = object_key(obj)
        if kind == "DELETED":
            old = self.cache.pop(key, None)
            if old is not None:
                self.on_change(old, None)
        elif kind in ("ADDED", "MODIFIED"):
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None or _rv(old) != _rv(obj):
                self.on_change(old, obj)
        return _rv(obj)

    async def _run_scope(self, scope: str | None) -> None:
        why = "initial"
        while True:
            try:
                if self._resume.get(scope) is None:
                    if self.on_relist:
                        self.on_relist(why)
                    self._resume[scope] = await self._relist(scope)
                    self._reachable()
                self._resume[scope] = await self._watch(scope, self._resume[scope])
            except _Gone:
                self._log.info("resourceVersion expired; relisting", namespace=scope)
                self._resume[scope], why = None, "expired"
            except asyncio.CancelledError:
                raise
            except ApiException as err:
                if err.status == 410:
                    self._log.info("resourceVersion expired; relisting", namespace=scope)
                    self._resume[scope], why = None, "expired"
                    continue
                await self._failed(scope, f"HTTP {err.status}: {err.reason}")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as err:
                await self._failed(scope, f"{type(err).__name__}: {err}")

    def _reachable(self) -> None:
        if self.consecutive_failures:
            self._log.info("API server reachable again", after_failures=self.consecutive_failures)
        self.consecutive_failures = 0
        self.unreachable_since = None
        if self.on_failure:
            self.on_failure(0)

    async def _failed(self, scope: str | None, error: str) -> None:
        self.consecutive_failures += 1
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
        if self.on_failure:
            self.on_failure(self.consecutive_failures)
        delay = min(self.max_backoff, 0.2 * 2 ** min(self.consecutive_failures, 10)) * random.uniform(0.5, 1.0)
        log_fn = self._log.warning if self.consecutive_failures in (1, 5) or self.consecutive_failures % 20 == 0 else self._log.debug
        log_fn("watch failed; retrying", namespace=scope, error=error, attempt=self.consecutive_failures,
               retry_in_s=round(delay, 2))
        await asyncio.sleep(delay)  # jittered back-off before reconnecting

    async def _resync_loop(self) -> None:
        """Replay the cache now and then: level-triggered reconciles heal any missed edge."""
        while True:
            await asyncio.sleep(self.resync_period * random.uniform(0.9, 1.1))
            for obj in list(self.cache.values()):
                self.on_change(obj, obj)
