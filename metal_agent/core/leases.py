"""The fleet's Leases: names, bodies, and when one has expired. Pure data, no I/O.

Two kinds live in the fleet namespace (the agent's own, `metal-agent` by
default), told apart by the `llmkube.ai/fleet-role` label:

- `member.<mac>`: one per agent, renewed every renew interval like a
  kubelet's node Lease. Its labels are the Mac's, plus its free memory,
  replicas serving and cordon as labels (so `kubectl get leases
  -l llmkube.ai/fleet-role=member -L llmkube.ai/chip` prints the fleet) and
  its `llmkube.ai/member` annotation carries the capacity placement reads.
- `replica.<namespace>.<service>.<N>`: who serves replica N. It is not
  renewed by itself: it is held while its holder's member Lease is live,
  the way a pod stays bound to a node while the node's Lease is renewed.
  One renewal per Mac, whatever it serves, instead of one per replica.

Expiry is judged by the observer's own clock: a Lease is expired when its
resourceVersion has not changed for its duration since *we* last saw it
change (client-go's leader election does the same), so clock skew between
Macs never decides anything.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field

from metal_agent.core.placement import Member
from metal_agent.core.registration import ISVC_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE

COORDINATION = ("coordination.k8s.io", "v1", "leases")
ROLE_LABEL = "llmkube.ai/fleet-role"
MEMBER_ROLE, REPLICA_ROLE = "member", "replica"
MEMBER_LABEL = "llmkube.ai/fleet-member"  # on replica Leases (the holder) and per-Mac EndpointSlices
ISVC_NAMESPACE_LABEL = "llmkube.ai/inference-service-namespace"
REPLICA_LABEL = "llmkube.ai/replica"
MEMBER_ANNOTATION = "llmkube.ai/member"
# Status as labels on a member Lease, for `kubectl get leases -L ...`; never placement labels.
FREE_GIB_LABEL, SERVING_LABEL, CORDONED_LABEL = "llmkube.ai/free-gib", "llmkube.ai/serving", "llmkube.ai/cordoned"
_NOT_PLACEMENT_LABELS = frozenset({ROLE_LABEL, MANAGED_BY_LABEL, FREE_GIB_LABEL, SERVING_LABEL, CORDONED_LABEL})
SUCCESSOR_ANNOTATION = "llmkube.ai/successor"  # a drain hands the replica over: who starts before the holder stops

_INVALID = re.compile(r"[^a-z0-9-]+")


def member_name(hostname: str) -> str:
    """A Mac's member name from its host name: a DNS label (`Jane's MacBook.local` -> `jane-s-macbook`)."""
    short = hostname.split(".", 1)[0].lower()
    name = _INVALID.sub("-", short).strip("-")[:63].strip("-")
    return name or "mac"


def member_lease_name(member: str) -> str:
    return f"member.{member}"


def replica_lease_name(key: str, index: int) -> str:
    namespace, name = key.split("/", 1)
    return f"replica.{namespace}.{name}.{index}"


def micro_time(at: dt.datetime) -> str:
    """A Lease's MicroTime, e.g. 2026-01-01T10:00:00.000000Z."""
    return at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class MemberInfo:
    """A member Lease's content: placement's view (`member`) plus what `metal-agent fleet` shows."""

    member: Member
    host: str = ""
    chip: str = ""
    total_bytes: int = 0
    serving: tuple[str, ...] = ()  # "namespace/name#replica"
    version: str = ""


def member_lease(info: MemberInfo, *, duration_s: int, now: dt.datetime, resource_version: str | None = None) -> dict:
    m = info.member
    payload = {
        "host": info.host, "chip": info.chip, "totalBytes": info.total_bytes, "budgetBytes": m.budget_bytes,
        "committedBytes": m.committed_bytes, "models": sorted(m.models), "allowlist": list(m.allowlist),
        "unfit": dict(sorted(m.unfit.items())), "cordoned": m.cordoned, "serving": list(info.serving),
        "version": info.version,
    }
    meta: dict = {
        "name": member_lease_name(m.name),
        "labels": {**m.labels, ROLE_LABEL: MEMBER_ROLE, MANAGED_BY_LABEL: MANAGED_BY_VALUE,
                   FREE_GIB_LABEL: str(m.free_bytes >> 30), SERVING_LABEL: str(len(info.serving)),
                   CORDONED_LABEL: str(m.cordoned).lower()},
        "annotations": {MEMBER_ANNOTATION: json.dumps(payload, separators=(",", ":"))},
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
        "spec": {"holderIdentity": m.name, "leaseDurationSeconds": duration_s, "renewTime": micro_time(now)},
    }


def _labels(lease: dict) -> dict:
    return (lease.get("metadata") or {}).get("labels") or {}


def role(lease: dict) -> str | None:
    return _labels(lease).get(ROLE_LABEL)


def parse_member(lease: dict) -> MemberInfo | None:
    """A member Lease read back; None when it is not one, or its annotation is unreadable."""
    if role(lease) != MEMBER_ROLE:
        return None
    holder = (lease.get("spec") or {}).get("holderIdentity")
    try:
        payload = json.loads(((lease.get("metadata") or {}).get("annotations") or {}).get(MEMBER_ANNOTATION) or "{}")
        labels = {k: v for k, v in _labels(lease).items() if k not in _NOT_PLACEMENT_LABELS}
        member = Member(
            name=str(holder or ""), labels=labels, cordoned=bool(payload.get("cordoned")),
            budget_bytes=int(payload.get("budgetBytes") or 0), committed_bytes=int(payload.get("committedBytes") or 0),
            models=frozenset(str(x) for x in payload.get("models") or ()),
            allowlist=tuple(str(x) for x in payload.get("allowlist") or ()),
            unfit={str(k): str(v) for k, v in (payload.get("unfit") or {}).items()},
        )
        info = MemberInfo(member, host=str(payload.get("host") or ""), chip=str(payload.get("chip") or ""),
                          total_bytes=int(payload.get("totalBytes") or 0),
                          serving=tuple(str(x) for x in payload.get("serving") or ()),
                          version=str(payload.get("version") or ""))
    except (ValueError, TypeError, AttributeError):
        return None
    return info if member.name else None


@dataclass(frozen=True)
class Replica:
    """A replica Lease read back."""

    key: str  # namespace/name of the InferenceService
    index: int
    holder: str | None
    successor: str | None
    resource_version: str
    lease_name: str


def parse_replica(lease: dict) -> Replica | None:
    if role(lease) != REPLICA_ROLE:
        return None
    meta = lease.get("metadata") or {}
    labels = _labels(lease)
    try:
        index = int(labels.get(REPLICA_LABEL, ""))
    except ValueError:
        return None
    ns, name = labels.get(ISVC_NAMESPACE_LABEL), labels.get(ISVC_LABEL)
    if not ns or not name:
        return None
    return Replica(key=f"{ns}/{name}", index=index, holder=(lease.get("spec") or {}).get("holderIdentity") or None,
                   successor=(meta.get("annotations") or {}).get(SUCCESSOR_ANNOTATION) or None,
                   resource_version=str(meta.get("resourceVersion") or ""), lease_name=str(meta.get("name") or ""))


def replica_lease(key: str, index: int, *, holder: str | None, duration_s: int, now: dt.datetime,
                  successor: str | None = None, resource_version: str | None = None) -> dict:
    """A replica Lease; with `resource_version`, an update that fails if anyone changed it meanwhile."""
    namespace, name = key.split("/", 1)
    meta: dict = {
        "name": replica_lease_name(key, index),
        "labels": {ROLE_LABEL: REPLICA_ROLE, MANAGED_BY_LABEL: MANAGED_BY_VALUE, ISVC_LABEL: name,
                   ISVC_NAMESPACE_LABEL: namespace, REPLICA_LABEL: str(index),
                   **({MEMBER_LABEL: holder} if holder else {})},
        "annotations": {SUCCESSOR_ANNOTATION: successor} if successor else {},
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    spec: dict = {"leaseDurationSeconds": duration_s, "acquireTime": micro_time(now), "renewTime": micro_time(now)}
    if holder:
        spec["holderIdentity"] = holder
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


@dataclass
class Liveness:
    """Which members are alive, by our own clock: a member Lease whose resourceVersion has
    not changed for its duration has expired. Fed by the lease watch; pure otherwise."""

    _seen: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # member -> (rv, changed_at, duration)

    def observe(self, member: str, resource_version: str, duration_s: float, now: float) -> None:
        old = self._seen.get(member)
        if old is None or old[0] != resource_version:
            self._seen[member] = (resource_version, now, duration_s)

    def forget(self, member: str) -> None:
        self._seen.pop(member, None)

    def alive(self, member: str, now: float) -> bool:
        seen = self._seen.get(member)
        return seen is not None and now - seen[1] <= seen[2]

    def expires_in(self, member: str, now: float) -> float | None:
        seen = self._seen.get(member)
        return None if seen is None else seen[1] + seen[2] - now

    def resource_version(self, member: str) -> str | None:
        seen = self._seen.get(member)
        return seen[0] if seen else None


def fence_deadline(last_renewed_at: float, duration_s: float, renew_interval_s: float) -> float:
    """Until when a member may serve after its last successful renewal (the request's *start*).

    Others may take its replicas `duration_s` after they saw that renewal,
    which is never earlier than when we sent it; stopping one renew interval
    before that leaves the stop the time it needs, so two Macs never serve one replica.
    """
    return last_renewed_at + max(duration_s - renew_interval_s, duration_s / 2)
