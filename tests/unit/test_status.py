"""Status rules: what the InferenceService says for each situation the agent can be in,
alone (CRDs only: the whole status) and beside LLMKube's controller (only its own fields)."""

from __future__ import annotations

from dataclasses import replace

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


CRASH = snap(State.BACKOFF, pid=None, restarts=3,
             last_exit=ExitInfo(ExitReason.PROCESS_EXITED, 1, ("error: unsupported cache type: turbo3",), 0.0))

# (id, inputs, phase, expected conditions (absent: None), readyReplicas)
CASES = [
    ("creating", StatusInputs(generation=1, wants_process=True), "Creating",
     {"Available": ("False", "Creating"), "Progressing": ("True", "Creating"), "Degraded": None,
      "MetalProcessReady": ("False", "Creating")}, None),
    ("loading", StatusInputs(generation=1, wants_process=True, process=snap(State.STARTING)), "Progressing",
     {"Available": ("False", "ModelLoading"), "Progressing": ("True", "ModelLoading"),
      "MetalProcessReady": ("False", "ModelLoading")}, None),
    ("ready", StatusInputs(generation=1, wants_process=True, process=snap(State.READY)), "Ready",
     {"Available": ("True", "InferenceReady"), "Progressing": None, "Degraded": None,
      "MetalProcessReady": ("True", "Ready"), "MetalSpecAccepted": ("True", "Accepted")}, 1),
    ("ready-one-of-two", StatusInputs(generation=1, wants_process=True, desired_replicas=2, process=snap(State.READY)),
     "Progressing", {"Available": ("True", "InferenceReady"), "Progressing": ("True", "Creating")}, 1),
    ("unhealthy", StatusInputs(generation=1, wants_process=True, process=snap(State.UNHEALTHY)), "Progressing",
     {"Available": ("False", "Unhealthy"), "Degraded": ("True", "Unhealthy"),
      "MetalProcessReady": ("False", "Unhealthy")}, None),
    ("crashloop", StatusInputs(generation=1, wants_process=True, process=CRASH), "Failed",
     {"Available": ("False", "ProcessExited"), "Degraded": ("True", "CrashLoopBackOff"),
      "MetalProcessReady": ("False", "CrashLoopBackOff")}, None),
    ("startup-timeout", StatusInputs(generation=1, wants_process=True, process=snap(
        State.BACKOFF, pid=None, last_exit=ExitInfo(ExitReason.STARTUP_TIMEOUT, -15, (), 0.0))),
     "Failed", {"Available": ("False", "StartupTimeout")}, None),
    ("invalid-nothing-running", StatusInputs(generation=2, wants_process=True, spec_errors=("spec.contextSize: too small",)),
     "Failed", {"Available": ("False", "InvalidSpec"), "Degraded": ("True", "InvalidSpec"),
                "MetalSpecAccepted": ("False", "InvalidSpec")}, None),
    ("invalid-while-serving", StatusInputs(generation=2, wants_process=True, spec_errors=("spec.extraArgs[0]: owned",),
                                           process=snap(State.READY)),
     "Ready", {"Available": ("True", "InferenceReady"), "Degraded": ("True", "InvalidSpec"),
               "MetalProcessReady": ("True", "Ready"), "MetalSpecAccepted": ("False", "InvalidSpec")}, 1),
    ("stopped", StatusInputs(generation=3, wants_process=False), "Stopped",
     {"Available": ("False", "ManuallyScaledToZero"), "MetalProcessReady": ("False", "Stopped")}, None),
    ("suspended", StatusInputs(generation=3, wants_process=False, suspended=True), "Suspended",
     {"Available": ("False", "Suspended"), "MetalProcessReady": ("False", "Suspended")}, None),
    ("blocked", StatusInputs(generation=1, wants_process=True, blocker=Blocker("ModelNotFound", "no file")), "Failed",
     {"Available": ("False", "ModelNotFound"), "Degraded": ("True", "ModelNotFound"),
      "MetalProcessReady": ("False", "ModelNotFound")}, None),
    ("model-gone-while-serving", StatusInputs(generation=1, wants_process=True, process=snap(State.READY),
                                              degraded=Blocker("ModelNotFound", "Model tiny was not found")),
     "Ready", {"Available": ("True", "InferenceReady"), "Degraded": ("True", "ModelNotFound"),
               "MetalSpecAccepted": ("False", "ModelNotFound")}, 1),
    ("rollout-waits-for-download", StatusInputs(generation=2, wants_process=True, process=snap(State.READY),
                                                rollout=Blocker("ModelDownloading", "12 MiB of 40 MiB", phase="Creating")),
     "Ready", {"Available": ("True", "InferenceReady"), "Progressing": ("True", "ModelDownloading"), "Degraded": None,
               "MetalProcessReady": ("True", "Ready"), "MetalSpecAccepted": ("True", "Accepted")}, 1),
]


@pytest.mark.parametrize("inputs,phase,expected,ready", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_full_status_phase_and_conditions(inputs, phase, expected, ready):
    status = compute_status(inputs, None, T0)
    assert status["phase"] == phase
    got = conds(status)
    for ctype, value in expected.items():
        assert got.get(ctype) == value, ctype
    assert status.get("readyReplicas") == ready  # omitempty: a zero count is absent, as LLMKube writes it


@pytest.mark.parametrize("inputs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_shared_status_writes_only_agent_fields(inputs):
    """Beside LLMKube's controller: none of its fields or condition types, ever."""
    shared = StatusInputs(**{**inputs.__dict__, "shared": True})
    status = compute_status(shared, None, T0)
    assert set(status) <= {"phase", "conditions", "schedulingStatus", "schedulingMessage", "acceleration"}
    assert {c["type"] for c in status["conditions"]} <= {"MetalProcessReady", "MetalSpecAccepted", "MemoryPressure"}
    if inputs.wants_process:
        assert "phase" not in status
    else:
        assert status["phase"] == ("Suspended" if inputs.suspended else "Stopped")


def test_replica_counts_follow_spec_replicas_and_stopped_has_none():
    ready = compute_status(StatusInputs(generation=1, wants_process=True, desired_replicas=3,
                                        process=snap(State.READY)), None, T0)
    assert (ready["readyReplicas"], ready["replicas"], ready["desiredReplicas"]) == (1, 3, 3)
    stopped = compute_status(StatusInputs(generation=1, wants_process=False), None, T0)
    assert not {"readyReplicas", "replicas", "desiredReplicas", "endpoint"} & set(stopped)


def test_crashloop_message_carries_the_stderr_line():
    for shared in (False, True):
        status = compute_status(StatusInputs(generation=1, wants_process=True, process=CRASH, shared=shared), None, T0)
        process = next(c for c in status["conditions"] if c["type"] == "MetalProcessReady")
        assert "unsupported cache type: turbo3" in process["message"]
        assert "exited with code 1" in process["message"]


def test_invalid_while_serving_names_the_field():
    status = compute_status(CASES[8][1], None, T0)
    accepted = next(c for c in status["conditions"] if c["type"] == "MetalSpecAccepted")
    assert "spec.extraArgs[0]" in accepted["message"] and "last valid spec" in accepted["message"]


def test_model_not_accepted_by_llmkube_is_an_agent_condition():
    inputs = StatusInputs(generation=1, wants_process=True, process=snap(State.READY), shared=True,
                          model_not_accepted=Blocker("ModelNotReady", "use --allowed-host-path-roots"))
    accepted = next(c for c in compute_status(inputs, None, T0)["conditions"] if c["type"] == "MetalSpecAccepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "ModelNotReady")
    assert "--allowed-host-path-roots" in accepted["message"]


def test_acceleration_and_endpoint_are_reported():
    accel = Acceleration("Metal", 33, 33)
    inputs = StatusInputs(generation=1, wants_process=True, process=snap(State.READY, acceleration=accel),
                          endpoint="http://a.ns.svc.cluster.local:8080/v1/chat/completions")
    status = compute_status(inputs, None, T0)
    assert status["acceleration"] == {"device": "Metal", "layersOffloaded": 33, "layersTotal": 33}
    assert status["endpoint"] == "http://a.ns.svc.cluster.local:8080/v1/chat/completions"
    assert "specHash" not in status and "observedGeneration" not in status  # not in LLMKube's CRD: pruned
    shared = compute_status(StatusInputs(**{**inputs.__dict__, "shared": True}), None, T0)
    assert shared["acceleration"] == status["acceleration"] and "endpoint" not in shared


def test_scheduling_fields_are_written_while_waiting_for_memory():
    inputs = StatusInputs(generation=1, wants_process=True, shared=True,
                          blocker=Blocker("InsufficientMemory", "needs 9 GiB", phase="Pending"),
                          scheduling=("InsufficientMemory", "needs 9 GiB"))
    status = compute_status(inputs, None, T0)
    assert (status["schedulingStatus"], status["schedulingMessage"]) == ("InsufficientMemory", "needs 9 GiB")
    assert "schedulingStatus" not in compute_status(StatusInputs(generation=1, wants_process=True), None, T0)


def test_shared_status_leaves_llmkubes_waiting_for_the_agent_alone_while_nothing_is_diagnosed():
    """Beside LLMKube, "WaitingForMetalAgent" is true while no Mac serves: a write of ours then
    (the model loading) must not blank it, or LLMKube's controller writes it straight back."""
    loading = StatusInputs(generation=1, wants_process=True, shared=True, process=snap(State.STARTING))
    status = compute_status(loading, {"phase": "Creating", "schedulingStatus": "WaitingForMetalAgent"}, T0)
    assert not {"schedulingStatus", "schedulingMessage", "waitingFor"} & set(status)


def test_transition_time_moves_only_when_status_flips():
    first = compute_status(StatusInputs(generation=1, wants_process=True, process=snap(State.STARTING)), None, T0)
    second = compute_status(StatusInputs(generation=1, wants_process=True, process=snap(State.READY)), first, T1)
    by_type = {c["type"]: c for c in second["conditions"]}
    assert by_type["Available"]["lastTransitionTime"] == T1  # False -> True
    assert by_type["MetalProcessReady"]["lastTransitionTime"] == T1  # False -> True
    assert by_type["MetalSpecAccepted"]["lastTransitionTime"] == T0  # True -> True


def test_other_writers_conditions_are_not_part_of_the_intent():
    """Server-side apply keeps them; applying them would make us their co-owner."""
    previous = {"conditions": [{"type": "Suspended", "status": "False", "reason": "NotSuspended",
                                "lastTransitionTime": T0}]}
    for shared in (False, True):
        status = compute_status(StatusInputs(generation=1, wants_process=True, shared=shared), previous, T1)
        assert "Suspended" not in {c["type"] for c in status["conditions"]}


def test_merge_conditions_keeps_other_types():
    previous = [{"type": "MemoryPressure", "status": "False", "reason": "Normal", "lastTransitionTime": T0}]
    merged = merge_conditions(previous, [Condition("Available", True, "Ready")], T1, 4)
    assert [c["type"] for c in merged] == ["Available", "MemoryPressure"]
    assert merged[0]["observedGeneration"] == 4


# --- partial offload: serving, but part of the model runs on the CPU (issue 13, item 1) ---

PARTIAL = Acceleration("MTL0 (Apple M2 Max)", 30, 49)


def _cond(status: dict, ctype: str) -> dict | None:
    return next((c for c in status["conditions"] if c["type"] == ctype), None)


def test_partial_offload_is_degraded_but_ready_in_full_mode():
    inputs = StatusInputs(generation=1, wants_process=True, process=snap(State.READY, acceleration=PARTIAL))
    status = compute_status(inputs, None, T0)
    assert status["phase"] == "Ready"  # it serves; slower, not down
    got = conds(status)
    assert got["Available"] == ("True", "InferenceReady")
    assert got["Degraded"] == ("True", "PartialOffload")
    assert got["MetalProcessReady"] == ("True", "Ready")
    assert _cond(status, "Degraded")["message"].startswith("partial offload 30/49 layers: 19 run on the CPU")
    assert status["acceleration"] == {"device": "MTL0 (Apple M2 Max)", "layersOffloaded": 30, "layersTotal": 49}


def test_partial_offload_is_said_in_the_agents_own_condition_when_shared():
    inputs = StatusInputs(generation=1, wants_process=True, shared=True,
                          process=snap(State.READY, acceleration=PARTIAL))
    status = compute_status(inputs, None, T0)
    process = _cond(status, "MetalProcessReady")
    assert (process["status"], process["reason"]) == ("True", "Ready")
    assert process["message"].startswith("partial offload 30/49 layers: ")
    assert "memory" in process["message"] and "serving on port 8081" in process["message"]
    assert _cond(status, "Degraded") is None  # LLMKube's condition type: its controller's to write


@pytest.mark.parametrize(
    "accel",
    [Acceleration("MTL0 (Apple M2 Max)", 49, 49), Acceleration("CPU", 0, 49), Acceleration("CPU", 0, 0), None],
    ids=["full", "none-offloaded", "cpu-build", "unknown"],
)
def test_only_a_partial_offload_degrades(accel):
    inputs = StatusInputs(generation=1, wants_process=True, process=snap(State.READY, acceleration=accel))
    status = compute_status(inputs, None, T0)
    assert _cond(status, "Degraded") is None
    assert _cond(status, "MetalProcessReady")["message"] == "llama-server is serving on port 8081"


def test_partial_offload_the_model_asked_for_is_not_a_shortfall():
    # spec.hardware.gpu.layers 30 asked for exactly this split (and 20 for less); 40, all (0) or auto (-1) got less.
    for asked, degraded in ((30, False), (20, False), (40, True), (0, True), (-1, True)):
        inputs = StatusInputs(generation=1, wants_process=True, gpu_layers=asked,
                              process=snap(State.READY, acceleration=PARTIAL))
        assert (_cond(compute_status(inputs, None, T0), "Degraded") is not None) is degraded, asked


def test_an_invalid_spec_outranks_a_partial_offload():
    inputs = StatusInputs(generation=2, wants_process=True, spec_errors=("spec.extraArgs[0]: owned",),
                          process=snap(State.READY, acceleration=PARTIAL))
    assert conds(compute_status(inputs, None, T0))["Degraded"] == ("True", "InvalidSpec")


def test_a_rollout_says_the_previous_spec_serves_until_the_new_model_is_there():
    inputs = StatusInputs(generation=2, wants_process=True, process=snap(State.READY),
                          rollout=Blocker("ModelDownloading", "downloading next.gguf: 12 MiB of 40 MiB", phase="Creating"))
    for shared in (False, True):
        status = compute_status(replace(inputs, shared=shared), None, T0)
        ready = next(c for c in status["conditions"] if c["type"] == "MetalProcessReady")
        assert "previous spec" in ready["message"] and "12 MiB of 40 MiB" in ready["message"]


def test_each_write_of_a_crash_loop_pairs_its_phase_with_its_own_available_reason():
    """A crash loop alternates back-off and restart, each one status write. Every write
    must be whole: `Failed` only beside the exit that caused it, `Progressing` only beside
    `ModelLoading`; never a phase of one moment with a reason left from the other
    (issue 25: a reader saw `Failed` with `ModelLoading`, from three separate reads)."""
    loading = StatusInputs(generation=1, wants_process=True, process=snap(State.STARTING, restarts=1))
    crashed = StatusInputs(generation=1, wants_process=True, process=CRASH)
    expected = {"Failed": ("False", "ProcessExited"), "Progressing": ("False", "ModelLoading")}
    previous = None
    for step, inputs in enumerate([loading, crashed] * 3):
        status = compute_status(inputs, previous, T0 if step % 2 else T1)
        phase = status["phase"]
        assert conds(status)["Available"] == expected[phase], (step, status)
        assert conds(status).get("Degraded") == (("True", "CrashLoopBackOff") if phase == "Failed" else None)
        previous = status


@pytest.mark.parametrize("shared", [True, False])
def test_an_unusable_api_key_secret_is_the_agents_own_condition_and_goes_when_the_annotation_does(shared):
    bad = Condition("MetalApiKeyReady", False, "ApiKeySecretNotFound", "Secret ns/keys named by ... does not exist")
    inputs = StatusInputs(generation=1, wants_process=True, process=snap(State.READY), shared=shared, api_key=bad)
    first = compute_status(inputs, None, T0)
    assert conds(first)["MetalApiKeyReady"] == ("False", "ApiKeySecretNotFound")
    if not shared:
        assert first["phase"] == "Ready"  # serving goes on: a key problem is not an outage
    gone = compute_status(replace(inputs, api_key=None), first, T0)
    assert "MetalApiKeyReady" not in conds(gone)
