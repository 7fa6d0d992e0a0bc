"""Who writes status, read from the cluster; and when an apply would change nothing."""

from __future__ import annotations

from metal_agent.adapters.kube.status_writer import already_applied
from metal_agent.core.status_owner import StatusMode, decide, model_not_ready, status_writers


def entry(manager: str, fields: dict, operation: str = "Update") -> dict:
    return {"manager": manager, "operation": operation, "subresource": "status", "apiVersion": "x",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:status": fields}}


def isvc(*entries: dict, status: dict | None = None) -> dict:
    return {"metadata": {"name": "a", "namespace": "ns", "managedFields": list(entries)}, "status": status or {}}


CONTROLLER = entry("manager", {"f:phase": {}, "f:conditions": {}, "f:lastUpdated": {}})


def test_controller_writing_phase_means_shared():
    owner = decide(StatusMode.AUTO, isvc(CONTROLLER), None)
    assert owner.shared and "manager" in owner.why
    assert status_writers(isvc(CONTROLLER)) == ["manager"]


def test_agents_are_not_controllers():
    """Ours (now and before server-side apply) and LLMKube's Go agent: none means a controller runs."""
    agents = [entry("metal-agent", {"f:phase": {}}, "Apply"), entry("OpenAPI-Generator", {"f:phase": {}}),
              entry("llmkube-metal-agent", {"f:phase": {}})]
    assert not decide(StatusMode.AUTO, isvc(*agents), None).shared


def test_a_writer_of_other_fields_only_is_not_the_controller():
    assert not decide(StatusMode.AUTO, isvc(entry("kubectl-edit", {"f:schedulingMessage": {}})), None).shared


def test_model_status_shows_llmkube_model_controller():
    model = {"metadata": {"name": "m"}, "status": {"phase": "Ready"}}
    assert decide(StatusMode.AUTO, isvc(), model).shared
    assert not decide(StatusMode.AUTO, isvc(), {"metadata": {"name": "m"}}).shared


def test_cluster_memory_and_flags():
    assert decide(StatusMode.AUTO, isvc(), None, controller_seen=True).shared
    assert not decide(StatusMode.FULL, isvc(CONTROLLER), None).shared
    assert decide(StatusMode.SHARED, isvc(), None).shared


def test_model_not_ready_gives_llmkube_reason_and_the_fix():
    model = {"metadata": {"name": "tiny"}, "status": {"phase": "Failed", "conditions": [
        {"type": "Degraded", "status": "True", "reason": "SourceNotAllowed",
         "message": "local/hostPath model sources are disabled: no allowed roots configured"}]}}
    reason, message = model_not_ready(model)
    assert reason == "ModelNotReady"
    assert "SourceNotAllowed" in message and "--allowed-host-path-roots" in message and "hf://" in message
    assert model_not_ready({"status": {"phase": "Ready"}}) is None
    assert model_not_ready({"metadata": {"name": "x"}}) is None  # CRDs only: nobody judges Models


OURS = entry("metal-agent", {"f:phase": {}, "f:conditions": {'k:{"type":"MetalProcessReady"}': {".": {}}}}, "Apply")
COND = {"type": "MetalProcessReady", "status": "True", "reason": "Ready", "message": "m",
        "lastTransitionTime": "t", "observedGeneration": 1}


def test_already_applied_when_our_fields_say_the_same():
    raw = isvc(OURS, CONTROLLER, status={"phase": "Stopped", "conditions": [COND]})
    assert already_applied(raw, {"phase": "Stopped", "conditions": [COND]})


def test_not_applied_when_a_value_or_the_owned_set_differs():
    raw = isvc(OURS, status={"phase": "Stopped", "conditions": [COND]})
    assert not already_applied(raw, {"phase": "Suspended", "conditions": [COND]})
    assert not already_applied(raw, {"conditions": [COND]})  # we would give up phase: that is a write
    assert not already_applied(raw, {"phase": "Stopped", "conditions": [{**COND, "message": "other"}]})
    assert not already_applied(isvc(status={"phase": "Stopped"}), {"phase": "Stopped"})  # nothing owned yet


def test_stale_agent_absent_scheduling_is_cleared_only_when_llmkube_says_ready_and_we_serve():
    from metal_agent.core.status_owner import stale_scheduling
    stale = {"status": {"phase": "Ready", "schedulingStatus": "AgentHeartbeatStale", "schedulingMessage": "m"}}
    assert stale_scheduling(stale, serving=True) == ("schedulingStatus", "schedulingMessage")
    assert stale_scheduling(stale, serving=False) == ()
    creating = {"status": {"phase": "Creating", "schedulingStatus": "WaitingForMetalAgent"}}
    assert stale_scheduling(creating, serving=True) == ()  # not worth a write of its own: LLMKube may still mean it
    memory = {"status": {"phase": "Ready", "schedulingStatus": "InsufficientMemory"}}
    assert stale_scheduling(memory, serving=True) == ()  # ours: server-side apply gives it up


def test_the_agent_absent_leftover_is_blanked_in_a_write_made_anyway_once_we_serve():
    from metal_agent.core.status_owner import leftover_blanks
    # Mid-respawn LLMKube saw no ready endpoint; the write reporting the new process Ready blanks
    # what it wrote, before its phase catches up.
    creating = {"status": {"phase": "Creating", "schedulingStatus": "WaitingForMetalAgent",
                           "schedulingMessage": "Waiting for the host metal-agent"}}
    assert leftover_blanks(creating, serving=True) == {"schedulingStatus": "", "schedulingMessage": ""}
    assert leftover_blanks(creating, serving=False) == {}  # not serving: LLMKube is right
    stale = {"status": {"phase": "Creating", "schedulingStatus": "AgentHeartbeatStale", "waitingFor": "x"}}
    assert leftover_blanks(stale, serving=True) == {"schedulingStatus": "", "waitingFor": ""}
    memory = {"status": {"phase": "Creating", "schedulingStatus": "InsufficientMemory", "schedulingMessage": "m"}}
    assert leftover_blanks(memory, serving=True) == {}  # the agent's own diagnosis is applied, not blanked
    assert leftover_blanks({"status": {"phase": "Ready"}}, serving=True) == {} and leftover_blanks(None, serving=True) == {}
