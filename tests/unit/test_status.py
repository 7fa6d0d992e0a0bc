"""Status rules: what the InferenceService says for each situation the agent can be in."""

from __future__ import annotations

import pytest

from metal_agent.core.conditions import Condition, merge_conditions
from metal_agent.core.llama_log import Acceleration
from metal_agent.core.process import ExitInfo, ExitReason, Snapshot, State
from metal_agent.core.status import Blocker, StatusInputs, compute_status

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def snap(state: State, **kw) -> Snapshot:
    return Snapshot(key="ns/a", spec_hash="h" * 64, state=state, pid=kw.pop("pid", 42), port=8081, **kw)


def conds(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


CASES = [
    ("creating", StatusInputs(generation=1, wants_process=True), "Creating",
     {"Available": ("False", "Creating"), "Progressing": ("True", "Creating"), "Degraded": ("False", "AsExpected")}, 0),
    ("loading", StatusInputs(generation=1, wants_process=True, process=snap(State.STARTING)), "Progressing",
     {"Available": ("False", "ModelLoading"), "Progressing": ("True", "ModelLoading")}, 0),
    ("ready", StatusInputs(generation=1, wants_process=True, process=snap(State.READY)), "Ready",
     {"Available": ("True", "Ready"), "Degraded": ("False", "AsExpected")}, 1),
    ("unhealthy", StatusInputs(generation=1, wants_process=True, process=snap(State.UNHEALTHY)), "Progressing",
     {"Available": ("False", "Unhealthy"), "Degraded": ("True", "Unhealthy")}, 0),
    ("crashloop", StatusInputs(generation=1, wants_process=True, process=snap(
        State.BACKOFF, pid=None, restarts=3,
        last_exit=ExitInfo(ExitReason.PROCESS_EXITED, 1, ("error: unsupported cache type: turbo3",), 0.0))),
     "Failed", {"Available": ("False", "ProcessExited"), "Progressing": ("False", "CrashLoopBackOff"),
                "Degraded": ("True", "CrashLoopBackOff")}, 0),
    ("startup-timeout", StatusInputs(generation=1, wants_process=True, process=snap(
        State.BACKOFF, pid=None, last_exit=ExitInfo(ExitReason.STARTUP_TIMEOUT, -15, (), 0.0))),
     "Failed", {"Available": ("False", "StartupTimeout")}, 0),
    ("invalid-nothing-running", StatusInputs(generation=2, wants_process=True, spec_errors=("spec.contextSize: too small",)),
     "Failed", {"Available": ("False", "InvalidSpec"), "Degraded": ("True", "InvalidSpec")}, 0),
    ("invalid-while-serving", StatusInputs(generation=2, wants_process=True, spec_errors=("spec.extraArgs[0]: owned",),
                                           process=snap(State.READY)),
     "Ready", {"Available": ("True", "Ready"), "Degraded": ("True", "InvalidSpec")}, 1),
    ("stopped", StatusInputs(generation=3, wants_process=False), "Stopped",
     {"Available": ("False", "Stopped")}, 0),
    ("suspended", StatusInputs(generation=3, wants_process=False, suspended=True), "Suspended",
     {"Available": ("False", "Suspended")}, 0),
    ("blocked", StatusInputs(generation=1, wants_process=True, blocker=Blocker("ModelNotFound", "no file")), "Failed",
     {"Available": ("False", "ModelNotFound"), "Degraded": ("True", "ModelNotFound")}, 0),
    ("model-gone-while-serving", StatusInputs(generation=1, wants_process=True, process=snap(State.READY),
                                              degraded=Blocker("ModelNotFound", "Model tiny was not found")),
     "Ready", {"Available": ("True", "Ready"), "Degraded": ("True", "ModelNotFound")}, 1),
]


@pytest.mark.parametrize("inputs,phase,expected,ready", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_phase_and_conditions(inputs, phase, expected, ready):
    status = compute_status(inputs, None, T0)
    assert status["phase"] == phase
    got = conds(status)
    for ctype, value in expected.items():
        assert got[ctype] == value, ctype
    assert status["readyReplicas"] == ready
    assert status["observedGeneration"] == inputs.generation


def test_crashloop_message_carries_the_stderr_line():
    inputs = CASES[4][1]
    status = compute_status(inputs, None, T0)
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert "unsupported cache type: turbo3" in available["message"]
    assert "exited with code 1" in available["message"]


def test_invalid_while_serving_names_the_field():
    status = compute_status(CASES[7][1], None, T0)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert "spec.extraArgs[0]" in degraded["message"] and "last valid spec" in degraded["message"]


def test_acceleration_endpoint_and_hash_are_reported():
    accel = Acceleration("Metal", 33, 33)
    inputs = StatusInputs(generation=1, wants_process=True, process=snap(State.READY, acceleration=accel),
                          endpoint="http://a.ns.svc.cluster.local:8080", spec_hash="abc")
    status = compute_status(inputs, None, T0)
    assert status["acceleration"] == {"device": "Metal", "layersOffloaded": 33, "layersTotal": 33}
    assert status["endpoint"] == "http://a.ns.svc.cluster.local:8080"
    assert status["specHash"] == "abc"


def test_transition_time_moves_only_when_status_flips():
    first = compute_status(StatusInputs(generation=1, wants_process=True, process=snap(State.STARTING)), None, T0)
    second = compute_status(StatusInputs(generation=1, wants_process=True, process=snap(State.READY)), first, T1)
    by_type = {c["type"]: c for c in second["conditions"]}
    assert by_type["Available"]["lastTransitionTime"] == T1  # False -> True
    assert by_type["Degraded"]["lastTransitionTime"] == T0  # False -> False
    assert by_type["Progressing"]["lastTransitionTime"] == T1  # True -> False


def test_conditions_of_other_writers_are_kept():
    previous = [{"type": "MemoryPressure", "status": "False", "reason": "Normal", "lastTransitionTime": T0}]
    merged = merge_conditions(previous, [Condition("Available", True, "Ready")], T1, 4)
    assert [c["type"] for c in merged] == ["Available", "MemoryPressure"]
    assert merged[0]["observedGeneration"] == 4
