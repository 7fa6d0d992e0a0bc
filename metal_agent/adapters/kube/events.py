"""Kubernetes Events on InferenceServices, as `kubectl describe` shows them.

Events are the user's timeline (started, ready, exited with the stderr
line, restarting, respawned, invalid spec). A crash loop must not flood the
API, so a repeat of the same reason and message on the same object within
the aggregation window bumps the count of the existing Event instead of
creating a new one, as the Kubernetes event recorder does.

`emit` never blocks its caller: each Event is sent by a background task that
retries through an API outage (for `retry_for` seconds), so the timeline
still shows a crash that happened while the API server was down. Failures
are logged and swallowed: losing an Event must never affect a process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import socket
import time
import uuid

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.names import COMPONENT, GROUP, VERSION

log = structlog.get_logger(__name__)


class EventRecorder:
    def __init__(self, api: client.ApiClient, *, host: str | None = None, window: float = 600.0,
                 retry_for: float = 300.0) -> None:
        self.core = client.CoreV1Api(api)
        self.host = host or socket.gethostname()
        self.window = window
        self.retry_for = retry_for
        self._recent: dict[tuple, tuple[str, int, float]] = {}  # key -> (event name, count, first seen)
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()  # keeps aggregation of identical events ordered

    def emit(self, obj_meta: dict, reason: str, message: str, *, warning: bool = False) -> None:
        """Record an Event in the background (returns at once)."""
        task = asyncio.create_task(self._deliver(dict(obj_meta), reason, message, warning))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Wait for queued Events (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _deliver(self, obj_meta: dict, reason: str, message: str, warning: bool) -> None:
        deadline = time.monotonic() + self.retry_for
        delay = 0.5
        while True:
            try:
                async with self._lock:
                    await self._record(obj_meta, reason, message, warning=warning)
                return
            except ApiException as err:
                if err.status is not None and 400 <= err.status < 500 and err.status != 429:
                    log.warning("event rejected", service=f"{obj_meta.get('namespace')}/{obj_meta.get('name')}",
                                reason=reason, status=err.status, error=str(err.reason))
                    return
                failure = f"HTTP {err.status}"
            except Exception as err:  # noqa: BLE001 - losing an Event must never break anything
                failure = f"{type(err).__name__}: {err}"
            if time.monotonic() + delay > deadline:
                log.warning("could not record event", service=f"{obj_meta.get('namespace')}/{obj_meta.get('name')}",
                            reason=reason, error=failure)
                return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # back-off between retries
            delay = min(delay * 2, 15.0)

    async def _record(self, obj_meta: dict, reason: str, message: str, *, warning: bool) -> None:
        namespace, name = obj_meta.get("namespace"), obj_meta.get("name")
        kind = "Warning" if warning else "Normal"
        message = message[:1024]
        key = (namespace, name, obj_meta.get("uid"), reason, message, kind)
        now = dt.datetime.now(dt.timezone.utc)
        recent = self._recent.get(key)
        if recent and time.monotonic() - recent[2] < self.window:
            event_name, count, first = recent
            await self.core.patch_namespaced_event(
                event_name, namespace, {"count": count + 1, "lastTimestamp": now.isoformat()}
            )
            self._recent[key] = (event_name, count + 1, first)
            return
        event_name = f"{name}.{uuid.uuid4().hex[:12]}"
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=event_name, namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}", kind="InferenceService", name=name,
                namespace=namespace, uid=obj_meta.get("uid"),
                resource_version=obj_meta.get("resourceVersion"),
            ),
            reason=reason, message=message, type=kind, count=1,
            first_timestamp=now, last_timestamp=now,
            source=client.V1EventSource(component=COMPONENT, host=self.host),
            reporting_component=COMPONENT, reporting_instance=self.host,
        )
        await self.core.create_namespaced_event(namespace, body)
        self._recent[key] = (event_name, 1, time.monotonic())
        self._forget_old()

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - self.window
        for key in [k for k, (_, _, first) in self._recent.items() if first < cutoff]:
            del self._recent[key]
