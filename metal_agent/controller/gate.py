"""The gate: what the controller asks before it treats an InferenceService as this Mac's.

Two implementations answer it. `StaticGate` is `--inference-service-allowlist`
(empty: every Metal service): always ready, it speaks for every service it
admits and never reports one unplaced. `metal_agent.fleet.gate.FleetGate`
answers from the fleet's replica Leases: a service is this Mac's while it holds
one of them, only one Mac writes a service's status, and a service no Mac can
take is reported unplaced by one of them.

The protocol is exactly what the reconciler and the status reporter call; the
claim rule itself (`core.claim`) needs only `refusal`, and asks it through its
own smaller protocol so that the core never imports the controller.
"""

from __future__ import annotations

from typing import Protocol

from metal_agent.core.claim import Allowlist
from metal_agent.core.conditions import Condition
from metal_agent.core.status import Blocker


class Gate(Protocol):
    def refusal(self, namespace: str, name: str) -> str | None:
        """Why the service is not this Mac's now (None: it is). Also `core.claim.ClaimFilter`."""

    def admits(self, namespace: str, name: str) -> bool:
        """`refusal(...) is None`: the start-up sweep keeps what another Mac may serve."""

    def ready(self) -> bool:
        """Whether the answers above can be trusted yet (a fleet: Leases read, ours renewed)."""

    def speaks_for(self, key: str) -> bool:
        """Whether this Mac writes the status of `key` ("namespace/name")."""

    def unplaced(self, key: str) -> Blocker | None:
        """Why no Mac can serve `key`, when this Mac is the one that says so."""

    def placement(self, key: str) -> tuple[Condition | None, int]:
        """The `FleetPlacement` condition for `key`, and how many replicas are ready elsewhere."""


class StaticGate:
    """The gate of an agent without `--fleet`: the allowlist alone decides."""

    def __init__(self, allowlist: Allowlist = Allowlist()) -> None:
        self.allowlist = allowlist

    def refusal(self, namespace: str, name: str) -> str | None:
        return self.allowlist.refusal(namespace, name)

    def admits(self, namespace: str, name: str) -> bool:
        return self.allowlist.admits(namespace, name)

    def ready(self) -> bool:
        return True

    def speaks_for(self, key: str) -> bool:
        return True

    def unplaced(self, key: str) -> Blocker | None:
        return None

    def placement(self, key: str) -> tuple[Condition | None, int]:
        return None, 0


EVERY_SERVICE = StaticGate()
