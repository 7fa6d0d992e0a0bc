"""Which Macs may serve an InferenceService, and which of them should: pure placement rules.

A fleet member is described by what it publishes in its member Lease
(`Member`). Placement reads the spec users already write for pods:

- `spec.nodeSelector`: every key must equal (the Mac's labels);
- `spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution`:
  the terms are ORed, the expressions of one term ANDed, with the
  operators of core/v1 (`In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt`,
  `Lt`); `matchFields` may name `metadata.name` (the member's name), as a
  node's name is the only field a scheduler matches on;
- `spec.replicas` (0 with `suspend`): how many Macs serve it, one replica
  per Mac.

Preferences are the issue's: a Mac that already has the model file (no
download), then the one with the most memory left after the model, then the
name (so every member computes the same order from the same leases). The
order is the only coordination there is: each member waits `rank × step`
before bidding for a free replica, so the best Mac normally bids first and
wins the Lease; whoever wins, the Lease makes the outcome exactly one Mac.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metal_agent.core.conditions import Condition
from metal_agent.core.memory import gib

#: Well-known member labels, published next to the user's own `--label k=v`.
HOSTNAME_LABEL = "kubernetes.io/hostname"
CHIP_LABEL = "llmkube.ai/chip"
MEMORY_LABEL = "llmkube.ai/memory-gib"


@dataclass(frozen=True)
class Member:
    """A Mac of the fleet as its Lease describes it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    cordoned: bool = False
    budget_bytes: int = 0  # what all its models together may use (the memory admission's budget)
    committed_bytes: int = 0  # the estimates of what it runs
    models: frozenset[str] = frozenset()  # "namespace/model" whose file is on its disk
    allowlist: tuple[str, ...] = ()  # its --inference-service-allowlist; empty: every service
    unfit: Mapping[str, str] = field(default_factory=dict)  # service key -> why its admission refused it

    @property
    def free_bytes(self) -> int:
        return max(0, self.budget_bytes - self.committed_bytes)

    def admits_name(self, namespace: str, name: str) -> bool:
        return not self.allowlist or name in self.allowlist or f"{namespace}/{name}" in self.allowlist


@dataclass(frozen=True)
class Wanted:
    """What placement needs to know about one InferenceService."""

    key: str  # namespace/name
    model: str  # namespace/model
    replicas: int
    node_selector: Mapping[str, str] = field(default_factory=dict)
    terms: tuple[Mapping[str, Any], ...] | None = None  # required nodeSelectorTerms; None: no affinity

    @property
    def namespace(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split("/", 1)[1]


def wanted_from(raw: Mapping[str, Any], model_key: str, replicas: int) -> Wanted:
    """Read the placement fields of a raw InferenceService (already claimed as Metal's).

    Malformed placement fields are read as constraints nobody meets rather than
    ignored: a typo in a selector must not put a model on a Mac the user excluded.
    """
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    selector = spec.get("nodeSelector") or {}
    if not isinstance(selector, Mapping) or not all(isinstance(v, str) for v in selector.values()):
        selector = {"llmkube.ai/invalid-node-selector": "\x00"}
    terms: tuple[Mapping[str, Any], ...] | None = None
    node_affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}) if isinstance(spec.get("affinity"), Mapping) else {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") if isinstance(node_affinity, Mapping) else None
    if isinstance(required, Mapping):
        raw_terms = required.get("nodeSelectorTerms")
        terms = tuple(t for t in raw_terms if isinstance(t, Mapping)) if isinstance(raw_terms, list) else ()
    return Wanted(key=f"{meta.get('namespace', '')}/{meta.get('name', '')}", model=model_key,
                  replicas=max(0, replicas), node_selector=dict(selector), terms=terms)


def _expression_matches(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op = expr.get("key"), expr.get("operator")
    values = expr.get("values") or []
    if not isinstance(key, str) or not isinstance(values, list):
        return False
    present = key in labels
    value = labels.get(key)
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt"):
        if not present or len(values) != 1:
            return False
        try:
            have, bound = int(value), int(values[0])
        except (TypeError, ValueError):
            return False
        return have > bound if op == "Gt" else have < bound
    return False  # an unknown operator matches nothing (the apiserver would have refused it for a pod)


def _term_matches(term: Mapping[str, Any], member: Member) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # core/v1: an empty term matches no node
    if not all(isinstance(e, Mapping) and _expression_matches(e, member.labels) for e in expressions):
        return False
    by_field = {"metadata.name": member.name}
    return all(isinstance(f, Mapping) and f.get("key") in by_field
               and _expression_matches(f, {f["key"]: by_field[f["key"]]}) for f in fields)


def selector_matches(wanted: Wanted, member: Member) -> bool:
    """Does the Mac satisfy the service's nodeSelector and required node affinity?"""
    if any(member.labels.get(k) != v for k, v in wanted.node_selector.items()):
        return False
    if wanted.terms is None:
        return True
    return any(_term_matches(term, member) for term in wanted.terms)


def why_not(wanted: Wanted, member: Member, holding: frozenset[str] = frozenset()) -> str | None:
    """Why `member` may not take a replica of `wanted` (None: it may). `holding`: members
    already serving a replica of it (one replica per Mac)."""
    if member.name in holding:
        return "already serves a replica"
    if not member.admits_name(wanted.namespace, wanted.name):
        return "not in its --inference-service-allowlist"
    if member.cordoned:
        return "cordoned (drained)"
    if not selector_matches(wanted, member):
        return "does not match the nodeSelector/affinity"
    if wanted.key in member.unfit:
        return member.unfit[wanted.key]
    return None


def rank(wanted: Wanted, members: list[Member], holding: frozenset[str] = frozenset()) -> list[Member]:
    """The members that may take a free replica of `wanted`, best first."""
    eligible = [m for m in members if why_not(wanted, m, holding) is None]
    return sorted(eligible, key=lambda m: (wanted.model not in m.models, -m.free_bytes, m.name))


def bid_delay(wanted: Wanted, members: list[Member], me: str, step: float,
              holding: frozenset[str] = frozenset()) -> float | None:
    """How long `me` waits before bidding for a free replica (None: it must not bid)."""
    order = [m.name for m in rank(wanted, members, holding)]
    return order.index(me) * step if me in order else None


def unschedulable_message(wanted: Wanted, members: list[Member], holding: frozenset[str] = frozenset()) -> str:
    """Why no Mac can take the service's remaining replicas, with the numbers, grouped by reason."""
    reasons: dict[str, list[str]] = {}
    for m in sorted(members, key=lambda m: m.name):
        why = why_not(wanted, m, holding) or "eligible"
        reasons.setdefault(why, []).append(f"{m.name} ({gib(m.free_bytes)} of {gib(m.budget_bytes)} free)")
    placed = len(holding)
    head = (f"{placed}/{wanted.replicas} replicas placed; " if placed else "") + \
        f"0/{len(members)} Macs can take {'another replica' if placed else 'it'}"
    if wanted.node_selector:
        head += f" (nodeSelector {', '.join(f'{k}={v}' for k, v in sorted(wanted.node_selector.items()))})"
    return head + ": " + "; ".join(f"{', '.join(names)}: {why}" for why, names in sorted(reasons.items()))


def placement_condition(replicas: int, holders: Mapping[int, tuple[str, bool]], unplaced: str | None = None) -> Condition:
    """`FleetPlacement`: which Mac serves each replica (`holders`: index -> (member, ready)).

    True once every wanted replica has a Mac; the message names them all, so
    `kubectl describe` answers "where does this run?" without a second command.
    """
    placed = [f"replica {i} on {name} ({'ready' if ready else 'starting'})"
              for i, (name, ready) in sorted(holders.items()) if i < replicas]
    message = ", ".join(placed) or "no Mac serves it"
    if len(placed) >= replicas:
        return Condition("FleetPlacement", True, "Placed", message)
    missing = replicas - len(placed)
    reason = "Unschedulable" if unplaced else "Placing"
    tail = f"; {missing} replica{'s' if missing > 1 else ''} unplaced" + (f": {unplaced}" if unplaced else "")
    return Condition("FleetPlacement", False, reason, message + tail)
