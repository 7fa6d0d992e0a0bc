"""What holds a running process in place, or ends it, apart from the spec itself.

A changed spec would respawn the engine at once; two things hold it back
while the previous process keeps serving: its new model is not on disk yet
(make before break: a download can take hours), and the user's
`rolloutPolicy.waitForIdle` while requests are in flight. And a process can
be due for replacement with an unchanged spec: `maxPodLifetimeSeconds`.
The rules are the core's (core/lifecycle.py); idleness is what the front door
sees (in flight or queued per service, its `GET /state`). Without the front
door it cannot be seen and counts as busy (fail closed, as LLMKube does), so
only the timeouts end the wait.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog

from metal_agent.adapters.model_files import ModelFiles, ModelPending, ModelReady
from metal_agent.core.lifecycle import Verdict, recycle, rollout, seconds_until_expiry
from metal_agent.core.status import Blocker
from metal_agent.core.workload import Workload

log = structlog.get_logger(__name__)

IDLE_RECHECK_S = 1.0  # while a rollout or a recycle waits for idle, look again this often


@dataclass(frozen=True)
class Deferred:
    """A changed spec that cannot replace the running process yet."""

    pending: Blocker | None = None  # its model is downloading, or requests are in flight
    failed: Blocker | None = None  # its model cannot be had (shown as a spec problem)
    retry: float | None = None  # look again after this long (nothing else will say when)


class Rollouts:
    def __init__(self, *, model_files: ModelFiles, events, enqueue_after: Callable[[str, float], None],
                 activity: Callable[[], Awaitable[dict]] | None = None, clock: Callable[[], float] = time.time) -> None:
        """`activity()`: the front door's `GET /state` (None: no front door, idleness unknown)."""
        self.model_files = model_files
        self.events = events
        self.enqueue_after = enqueue_after
        self.activity = activity
        self.clock = clock
        self._reported: dict[str, tuple[str, str]] = {}
        self._deferred_since: dict[str, tuple[str, float]] = {}  # key -> (new digest, first deferred at)

    async def hold(self, key: str, raw: dict, workload: Workload, digest: str) -> Deferred | None:
        """Whether the changed spec (`digest`) must wait while the running process serves on."""
        found = self.model_files.lookup(workload.model, key, secret_ref=workload.model.spec.source_secret_ref)
        if not isinstance(found, ModelReady):
            return self._model_not_ready(key, raw, found, digest)
        self._reported.pop(key, None)
        return await self._wait_for_idle(key, raw, workload, digest)

    def _model_not_ready(self, key: str, raw: dict, found, digest: str) -> Deferred:
        if isinstance(found, ModelPending):
            deferred = Deferred(pending=Blocker("ModelDownloading", found.message, phase="Creating"))
        else:
            deferred = Deferred(failed=Blocker(found.reason, f"still serving the previous spec; {found.message}"))
        marker = (digest, found.reason if deferred.failed else "")
        if self._reported.get(key) != marker:
            self._reported[key] = marker
            log.info("spec changed; the running engine serves until the new model is ready", service=key,
                     new=digest[:12], why=found.message)
            self.events.emit(raw["metadata"], "RespawnDeferred",
                             f"spec changed (hash {digest[:12]}); llama-server keeps serving the previous spec "
                             f"until the new model is ready: {found.message}", warning=deferred.failed is not None)
        return deferred

    async def _wait_for_idle(self, key: str, raw: dict, workload: Workload, digest: str) -> Deferred | None:
        policy = workload.isvc.spec.rollout_policy
        if policy is None or not policy.defers:
            self._deferred_since.pop(key, None)
            return None
        now = self.clock()
        seen = self._deferred_since.get(key)
        since = seen[1] if seen is not None and seen[0] == digest else now
        verdict = rollout(policy, busy=await self.busy(key), waited_s=now - since)
        if verdict is Verdict.WAIT:
            if seen is None or seen[0] != digest:
                self._deferred_since[key] = (digest, since)
                self.events.emit(raw["metadata"], "RolloutDeferred", self._waiting(policy.timeout_s))
            return Deferred(pending=Blocker("RolloutDeferred", self._waiting(policy.timeout_s), phase="Progressing"),
                            retry=IDLE_RECHECK_S)
        self._deferred_since.pop(key, None)
        if verdict is Verdict.TIMED_OUT:
            self.events.emit(raw["metadata"], "IdleTimeoutExceeded", f"not idle after {policy.timeout_s} s "
                             "(rolloutPolicy.idleTimeoutSeconds); respawning anyway", warning=True)
        return None

    def _waiting(self, timeout_s: int) -> str:
        how = "requests are in flight" if self.activity is not None else \
            "idleness cannot be seen without the front door (--front-door)"
        return (f"rolloutPolicy.waitForIdle: the previous spec serves on while {how}; respawning when idle "
                f"or after {timeout_s} s (idleTimeoutSeconds)")

    async def must_recycle(self, key: str, raw: dict, workload: Workload, supervisor) -> bool:
        """Is the running process older than `maxPodLifetimeSeconds` and free to go (idle, or its
        wait for idle over)? Otherwise look again when it expires, or soon while it waits."""
        lifetime = workload.isvc.spec.lifetime
        snap = getattr(supervisor, "snapshot", None)
        if lifetime.max_s is None or snap is None or snap.started_at is None or not snap.ready:
            return False
        age = self.clock() - snap.started_at
        policy = workload.isvc.spec.rollout_policy
        needs_idle = policy is not None and policy.defers and age >= lifetime.max_s
        verdict = recycle(lifetime, policy, age_s=age, busy=await self.busy(key) if needs_idle else None)
        if verdict is Verdict.NOT_YET:
            self.enqueue_after(key, seconds_until_expiry(lifetime, age) or IDLE_RECHECK_S)
            return False
        if verdict is Verdict.WAIT:
            self.enqueue_after(key, IDLE_RECHECK_S)
            return False
        why = " (busy past maxPodLifetimeIdleTimeoutSeconds)" if verdict is Verdict.TIMED_OUT else ""
        log.info("recycling the engine: older than maxPodLifetimeSeconds", service=key, age_s=round(age))
        self.events.emit(raw["metadata"], "Recycling", f"the engine has run {int(age)} s, past "
                         f"maxPodLifetimeSeconds {lifetime.max_s}{why}; restarting it")
        return True

    async def busy(self, key: str) -> bool | None:
        """Requests in flight or queued for `key` at the front door; None when that is unknown."""
        if self.activity is None:
            return None
        try:
            routes = (await self.activity()).get("routes") or {}
        except Exception as err:  # noqa: BLE001 - the front door away: unknown, so busy (fail closed)
            log.debug("cannot read the front door's activity", service=key, error=str(err))
            return None
        seen = routes.get(key) if isinstance(routes, dict) else None
        if not isinstance(seen, dict):
            return None
        return bool(seen.get("inflight") or seen.get("queued"))

    def forget(self, key: str) -> None:
        self._reported.pop(key, None)
        self._deferred_since.pop(key, None)
