"""`metav1.Condition` lists, merged the way Kubernetes tools expect.

`lastTransitionTime` must move only when a condition's status flips: tools
(and people) read it as "since when has this been true". Rewriting it on
every reconcile would also make every status write look like a change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return {True: "True", False: "False", None: "Unknown"}[self.status]


def merge_conditions(previous: list[dict] | None, wanted: list[Condition], now: str, generation: int | None) -> list[dict]:
    """The new condition list: `wanted` in order, keeping transition times that did not flip.

    Conditions of other types (written by LLMKube's controller, say) are kept as they are.
    """
    by_type = {c.get("type"): c for c in previous or [] if isinstance(c, dict)}
    result = []
    for cond in wanted:
        old = by_type.pop(cond.type, None)
        same = old is not None and old.get("status") == cond.status_text
        entry = {
            "type": cond.type,
            "status": cond.status_text,
            "reason": cond.reason,
            "message": cond.message[:32768],
            "lastTransitionTime": old.get("lastTransitionTime", now) if same else now,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        result.append(entry)
    result.extend(by_type.values())
    return result
