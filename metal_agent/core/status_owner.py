"""Who writes an InferenceService's status: the agent alone, or LLMKube's controller with it.

Two writers of one field never settle: LLMKube's controller recomputes phase,
conditions, endpoint and replica counts on every change of the object (and of
our EndpointSlices), so an agent that writes them too rewrites them back, and
both go on for ever. So the agent writes the whole status only where nobody
else does (a cluster with just the CRDs), and otherwise only the fields
LLMKube's own Go agent writes and the controller preserves.

The decision is read from the cluster, per object, because that is where the
truth is: LLMKube's Model controller always writes `Model.status` (the agent
never does), and its InferenceService controller leaves its name in the
object's managedFields as the owner of `status.phase`. Either sign means the
controller runs. Writers known to be metal agents (ours, under its current
and former field managers, and LLMKube's Go agent) are not controllers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

FIELD_MANAGER = "metal-agent"

# Field managers of agents, never of a controller: ours (and the generated
# client's default, which versions before server-side apply wrote under), and
# LLMKube's Go Metal Agent.
AGENT_MANAGERS = frozenset({FIELD_MANAGER, "OpenAPI-Generator", "llmkube-metal-agent"})


class StatusMode(str, enum.Enum):
    AUTO = "auto"  # decide per object from what the cluster shows
    FULL = "full"  # the agent writes every status field (CRDs only, no controller)
    SHARED = "shared"  # LLMKube's controller owns most of status; the agent writes its own fields


@dataclass(frozen=True)
class Ownership:
    shared: bool
    why: str

    @property
    def label(self) -> str:
        return StatusMode.SHARED.value if self.shared else StatusMode.FULL.value


def status_writers(raw: dict | None) -> list[str]:
    """Managers (other than agents) that own `status.phase` of the object, from its managedFields."""
    found = []
    for entry in ((raw or {}).get("metadata") or {}).get("managedFields") or []:
        if not isinstance(entry, dict) or entry.get("subresource") != "status":
            continue
        manager = entry.get("manager") or ""
        fields = ((entry.get("fieldsV1") or {}).get("f:status") or {})
        if manager not in AGENT_MANAGERS and "f:phase" in fields:
            found.append(manager)
    return found


def decide(mode: StatusMode, isvc: dict | None, model: dict | None, *, controller_seen: bool = False) -> Ownership:
    """Whether the agent shares this object's status with LLMKube's controller, and why.

    `controller_seen` is the cluster-wide memory that some object already showed
    the controller at work: a service created a moment ago, not yet touched by
    it, then starts in shared mode instead of racing it with full writes.
    """
    if mode is StatusMode.FULL:
        return Ownership(False, "--status-mode full")
    if mode is StatusMode.SHARED:
        return Ownership(True, "--status-mode shared")
    if writers := status_writers(isvc):
        return Ownership(True, f"status.phase is written by {', '.join(sorted(set(writers)))} (LLMKube's controller)")
    if ((model or {}).get("status") or {}).get("phase"):
        return Ownership(True, "the Model's status is written by LLMKube's Model controller")
    if controller_seen:
        return Ownership(True, "LLMKube's controller writes other InferenceServices' status")
    return Ownership(False, "no LLMKube controller writes status (CRDs only)")


def shows_controller(isvc: dict | None, model: dict | None) -> bool:
    """Does this object pair show LLMKube's controller at work (for the cluster-wide memory)?"""
    return bool(status_writers(isvc)) or bool(((model or {}).get("status") or {}).get("phase"))


def model_not_ready(model: dict | None) -> tuple[str, str] | None:
    """Under LLMKube: why its Model controller has not marked the Model Ready, with the fix, or None.

    LLMKube's InferenceService controller keeps a service Pending until its Model is
    Ready, however well the Mac serves it; the user must learn why from our status.
    """
    status = (model or {}).get("status") or {}
    phase = status.get("phase")
    if not phase or phase == "Ready":
        return None
    name = ((model or {}).get("metadata") or {}).get("name", "")
    why = next((c for c in status.get("conditions") or [] if isinstance(c, dict) and (
        (c.get("type") == "Degraded" and c.get("status") == "True")
        or (c.get("type") in ("Available", "Ready") and c.get("status") == "False"))), {})
    reason = why.get("reason") or phase
    detail = f"{reason}: {why['message']}" if why.get("message") else reason
    message = (f"LLMKube has not marked Model {name} Ready (phase {phase}; {detail}); "
               "its controller keeps this service Pending until it does, although the Mac serves it")
    if reason == "SourceNotAllowed" or "allowed root" in detail or "hostPath" in detail:
        message += (". Fix: run LLMKube's manager with --allowed-host-path-roots=<folder holding the model> "
                    "(Helm value modelSource.allowedHostPathRoots), or use an hf:// or https:// source")
    return "ModelNotReady", message


def source_refused(model: dict | None) -> str | None:
    """Why LLMKube's Model controller refused this Model's source (`SourceNotAllowed`), or None.

    Its controller marks a local source outside its `--allowed-host-path-roots`
    Failed with a `Degraded=True` condition of reason `SourceNotAllowed`
    (internal/controller/model_controller.go, rejectDisallowedLocalSource). What
    the cluster's operator refused is not served by the Mac either. A condition
    of an older generation of the Model is stale (the controller has not looked
    at the current spec yet) and does not count, nor does one beside phase Ready.
    """
    model = model or {}
    generation = (model.get("metadata") or {}).get("generation")
    status = model.get("status") or {}
    if status.get("phase") == "Ready":
        return None  # the controller has since served it (some of its paths leave Degraded set)
    for c in status.get("conditions") or []:
        if not isinstance(c, dict) or c.get("reason") != "SourceNotAllowed" or c.get("status") != "True":
            continue
        seen = c.get("observedGeneration")
        if generation is not None and seen is not None and seen != generation:
            continue
        detail = c.get("message") or "its source is outside the operator's allowed host path roots"
        return (f"LLMKube's Model controller refused this Model's source (SourceNotAllowed: {detail}); the Mac"
                " does not serve a source the cluster's operator refused. Fix: run LLMKube's manager with"
                " --allowed-host-path-roots=<folder holding the model> (Helm value modelSource.allowedHostPathRoots),"
                " or use an hf:// or https:// source")
    return None


# What LLMKube's controller writes into schedulingStatus about the agent being absent.
AGENT_ABSENT = ("AgentHeartbeatStale", "WaitingForMetalAgent")


SCHEDULING_FIELDS = ("schedulingStatus", "schedulingMessage", "waitingFor")


def _agent_absent(status: dict, serving: bool) -> tuple[str, ...]:
    if not serving or status.get("schedulingStatus") not in AGENT_ABSENT:
        return ()
    return tuple(f for f in SCHEDULING_FIELDS if f in status)


def stale_scheduling(isvc: dict | None, *, serving: bool) -> tuple[str, ...]:
    """Scheduling fields LLMKube's controller left saying the agent is away, although it
    itself now reports the service Ready and this Mac serves it: the fields to clear.

    LLMKube's controller preserves schedulingStatus whenever it has nothing to say
    (so as not to clobber the agent's memory diagnosis), so its own "heartbeat
    stale" outlives the outage; LLMKube's Go agent clears these fields, and so do we.
    """
    status = (isvc or {}).get("status") or {}
    return _agent_absent(status, serving) if status.get("phase") == "Ready" else ()


def leftover_blanks(isvc: dict | None, *, serving: bool) -> dict[str, str]:
    """The same leftover, to blank inside a status write the agent makes anyway.

    A respawn leaves the slice not ready for a moment; if LLMKube's controller
    reconciles then, it writes "WaitingForMetalAgent", and keeps it after Ready.
    Blanking it in the very write that reports the new process Ready saves the
    separate clear (`stale_scheduling`) that would otherwise follow, whatever
    LLMKube's phase says yet: this Mac serves, so the agent is not absent. Its
    fields are omitempty strings, so "" reads as unset and its next update drops them.
    """
    return {f: "" for f in _agent_absent((isvc or {}).get("status") or {}, serving)}
