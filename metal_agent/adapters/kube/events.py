"""Kubernetes Events on InferenceServices, as `kubectl describe` shows them.

Events are the user's timeline (started, ready, exited with the stderr
line, restarting, respawned, invalid spec). A crash loop must not flood the
API, so a repeat of the same reason and message on the same object within
the aggregation window bumps the count of the existing Event instead of
creating a new one, as the Kubernetes event recorder does.

`emit` never blocks its caller: it puts the Event in a bounded buffer that
one background sender drains in order. An Event that cannot be sent (the
API server away, a Mac between networks) stays buffered and is retried with
jittered back-off for as long as the outage lasts, so the timeline still
shows a crash that happened meanwhile, with the time it happened. Repeats
are aggregated in the buffer too, so a crash loop during an outage costs one
entry, not one per crash. When the buffer is full the oldest Event is
dropped and counted (`events_dropped_total{reason="overflow"}`); an Event
the API server rejects is dropped and counted as `rejected` (401/403 only
when they persist: a restarted API server denies for a few seconds), and those
still buffered at shutdown as `shutdown`. Each API call is bounded by
`call_timeout`, so one hung call holds the others back no longer than that,
and an Event whose call timed out goes to the back of the line, so it cannot
hold the rest back on every retry. Otherwise Events go out in the order they
happened. Losing an Event never affects a process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import Counter

from metal_agent.adapters.kube.client import DEFAULT_TIMEOUT
from metal_agent.core.backoff import Backoff
from metal_agent.core.names import COMPONENT, GROUP, VERSION
from metal_agent.tasks import cancel_and_wait, within

log = structlog.get_logger(__name__)

_Key = tuple  # (namespace, name, uid, reason, message, type): what makes two Events "the same"


@dataclass
class _Pending:
    obj_meta: dict
    reason: str
    message: str
    kind: str
    first: dt.datetime
    last: dt.datetime
    count: int = 1
    denied: int = 0  # 401/403 answers so far


# An API server that has just restarted answers 401/403 for a few seconds,
# until its authenticator and RBAC caches are filled: an Event raised during
# the outage must survive that. A denial that persists is a real refusal.
_DENIALS_BEFORE_DROP = 6


class EventRecorder:
    def __init__(self, api: client.ApiClient, *, host: str | None = None, window: float = 600.0,
                 capacity: int = 1000, call_timeout: float | None = DEFAULT_TIMEOUT.total,
                 retry: Backoff = Backoff(initial=0.5, factor=2.0, cap=15.0, jitter=0.5),
                 dropped: Counter | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.core = client.CoreV1Api(api)
        self.host = host or socket.gethostname()
        self.window = window
        self.capacity = capacity
        self.call_timeout = call_timeout
        self.retry = retry
        self._dropped = dropped
        self._recent: dict[_Key, tuple[str, int, float]] = {}  # key -> (event name, count, first seen)
        self._pending: OrderedDict[_Key, _Pending] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        """Events buffered and not yet delivered."""
        return len(self._pending)

    def emit(self, obj_meta: dict, reason: str, message: str, *, warning: bool = False) -> None:
        """Record an Event in the background (returns at once)."""
        kind = "Warning" if warning else "Normal"
        message = message[:1024]
        key = (obj_meta.get("namespace"), obj_meta.get("name"), obj_meta.get("uid"), reason, message, kind)
        now = dt.datetime.now(dt.timezone.utc)
        pending = self._pending.get(key)
        if pending is not None:
            pending.count += 1
            pending.last = now
        else:
            if len(self._pending) >= self.capacity:
                _, oldest = self._pending.popitem(last=False)
                self._drop("overflow", oldest)
            self._pending[key] = _Pending(dict(obj_meta), reason, message, kind, first=now, last=now)
        self._idle.clear()
        self._wakeup.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all(), name="event-sender")

    async def flush(self) -> None:
        """Wait until every buffered Event is delivered (tests, shutdown)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop sending; Events still buffered are dropped and counted."""
        if self._sender is not None:
            await cancel_and_wait(self._sender)
            self._sender = None
        while self._pending:
            _, item = self._pending.popitem(last=False)
            self._drop("shutdown", item)
        self._idle.set()

    def _drop(self, why: str, item: _Pending, **detail) -> None:
        if self._dropped is not None:
            self._dropped.labels(why).inc(item.count)
        log.warning("event dropped", why=why, service=f"{item.obj_meta.get('namespace')}/{item.obj_meta.get('name')}",
                    reason=item.reason, count=item.count, **detail)

    async def _send_all(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key, item = next(iter(self._pending.items()))
            sending = item.count
            try:
                await within(self._record(key, item, sending), self.call_timeout)
            except ApiException as err:
                if err.status in (401, 403):
                    item.denied += 1
                if err.status is not None and 400 <= err.status < 500 and err.status != 429 and (
                    err.status not in (401, 403) or item.denied >= _DENIALS_BEFORE_DROP
                ):
                    if self._pending.get(key) is item:
                        del self._pending[key]
                    self._drop("rejected", item, status=err.status, error=str(err.reason))
                    continue
                failure = f"HTTP {err.status}"
            except TimeoutError:
                failure = f"no answer within {self.call_timeout:g}s"
                if key in self._pending:  # a call that hangs must not hold the line on every retry
                    self._pending.move_to_end(key)
            except Exception as err:  # noqa: BLE001 - transport errors of every kind: keep it and retry
                failure = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                failures = 0
                item.count -= sending  # repeats that arrived while sending go in the next patch
                if item.count <= 0 and self._pending.get(key) is item:
                    del self._pending[key]
                continue
            failures += 1
            delay = self.retry.delay(failures)
            if failures == 1:
                log.warning("could not record event; keeping it and retrying", error=failure,
                            buffered=len(self._pending), retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _record(self, key: _Key, item: _Pending, count: int) -> None:
        namespace, name = item.obj_meta.get("namespace"), item.obj_meta.get("name")
        recent = self._recent.get(key)
        if recent and time.monotonic() - recent[2] < self.window:
            event_name, total, first = recent
            try:
                await self.core.patch_namespaced_event(
                    event_name, namespace, {"count": total + count, "lastTimestamp": item.last.isoformat()}
                )
            except ApiException as err:
                if err.status != 404:
                    raise
                del self._recent[key]  # expired (Events live an hour) or deleted: create a new one
            else:
                self._recent[key] = (event_name, total + count, first)
                return
        event_name = f"{name}.{uuid.uuid4().hex[:12]}"
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=event_name, namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}", kind="InferenceService", name=name,
                namespace=namespace, uid=item.obj_meta.get("uid"),
                resource_version=item.obj_meta.get("resourceVersion"),
            ),
            reason=item.reason, message=item.message, type=item.kind, count=count,
            first_timestamp=item.first, last_timestamp=item.last,
            source=client.V1EventSource(component=COMPONENT, host=self.host),
            reporting_component=COMPONENT, reporting_instance=self.host,
        )
        await self.core.create_namespaced_event(namespace, body)
        self._recent[key] = (event_name, count, time.monotonic())
        self._forget_old()

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - self.window
        for key in [k for k, (_, _, first) in self._recent.items() if first < cutoff]:
            del self._recent[key]
