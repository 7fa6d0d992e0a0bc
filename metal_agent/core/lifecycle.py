"""When a running engine may be replaced: `rolloutPolicy` and `maxPodLifetimeSeconds` (issue 22).

LLMKube defines both for pods; on a Mac the "pod" is the engine process and
"idle" is what the front door sees (no request in flight or queued for the
service). The rules, as LLMKube's controller applies them:

- `rolloutPolicy.waitForIdle` (unless `force`): a changed spec respawns only
  once the service is idle, or once `idleTimeoutSeconds` (0 or unset: 300)
  have passed since the rollout was first deferred. Idleness that cannot be
  known counts as busy (fail closed), so the timeout is the bound.
- `maxPodLifetimeSeconds`: a process older than that is recycled (stopped and
  started again). With `waitForIdle` (and not `force`) it first waits for
  idle, bounded by `maxPodLifetimeIdleTimeoutSeconds` counted from the moment
  it expired (0: do not wait; unset: wait as long as it takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["DEFAULT_IDLE_TIMEOUT_S", "Lifetime", "RolloutPolicy", "Verdict", "recycle", "rollout", "seconds_until_expiry"]

DEFAULT_IDLE_TIMEOUT_S = 300


class Verdict(StrEnum):
    GO = "go"  # replace it now
    WAIT = "wait"  # it is busy (or unknown): look again
    TIMED_OUT = "timed-out"  # busy, but the wait is over: replace it anyway
    NOT_YET = "not-yet"  # (lifetime) not old enough


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    wait_for_idle: bool = False
    idle_timeout_s: int = 0  # 0: the default, 300
    force: bool = False

    @property
    def defers(self) -> bool:
        return self.wait_for_idle and not self.force

    @property
    def timeout_s(self) -> int:
        return self.idle_timeout_s or DEFAULT_IDLE_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Lifetime:
    max_s: int | None = None  # maxPodLifetimeSeconds
    idle_timeout_s: int | None = None  # maxPodLifetimeIdleTimeoutSeconds (None: wait indefinitely)


def rollout(policy: RolloutPolicy | None, *, busy: bool | None, waited_s: float) -> Verdict:
    """May a changed spec replace the running process now? `busy` None: unknown (counts as busy);
    `waited_s`: since the rollout was first deferred."""
    if policy is None or not policy.defers or busy is False:
        return Verdict.GO
    return Verdict.TIMED_OUT if waited_s >= policy.timeout_s else Verdict.WAIT


def recycle(lifetime: Lifetime, policy: RolloutPolicy | None, *, age_s: float, busy: bool | None) -> Verdict:
    """Is a process `age_s` old due to be recycled now?"""
    if lifetime.max_s is None or age_s < lifetime.max_s:
        return Verdict.NOT_YET
    if policy is None or not policy.defers or busy is False:
        return Verdict.GO
    if lifetime.idle_timeout_s is None:
        return Verdict.WAIT
    overdue = age_s - lifetime.max_s
    return Verdict.TIMED_OUT if overdue >= lifetime.idle_timeout_s else Verdict.WAIT


def seconds_until_expiry(lifetime: Lifetime, age_s: float) -> float | None:
    """When to look again at a process of this age (None: it never expires)."""
    if lifetime.max_s is None:
        return None
    return max(0.0, lifetime.max_s - age_s)
