"""InferenceService status from what the agent knows, as one pure function.

Status is the user's only window onto a process on someone's Mac, so it must
say exactly what is true: loading is not ready, a crash loop is not
"progressing", and a typo in a running service's spec is a degraded service
still serving its last good spec, not an outage. Keeping the rules here, free
of I/O, lets them be tested case by case.
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.core.conditions import Condition, merge_conditions
from metal_agent.core.process import Snapshot, State


@dataclass(frozen=True)
class Blocker:
    """Why a wanted process cannot be started (yet): shown as the phase and Available=False."""

    reason: str  # e.g. ModelNotFound, ModelSourceUnsupported, InsufficientMemory
    message: str
    phase: str = "Failed"


@dataclass(frozen=True)
class StatusInputs:
    generation: int | None
    wants_process: bool
    suspended: bool = False
    spec_errors: tuple[str, ...] = ()  # every problem in the current spec; empty when valid
    blocker: Blocker | None = None
    process: Snapshot | None = None
    endpoint: str | None = None
    spec_hash: str | None = None
    degraded: Blocker | None = None  # a problem a running process survives (e.g. its Model vanished)
    scheduling: tuple[str, str] | None = None  # LLMKube's schedulingStatus/schedulingMessage (memory admission)
    memory_pressure: Condition | None = None


def _process_conditions(p: Snapshot) -> tuple[str, Condition, Condition, Condition]:
    """(phase, Available, Progressing, Degraded) for a supervised process."""
    if p.state is State.READY:
        return ("Ready",
                Condition("Available", True, "Ready", f"llama-server is serving on port {p.port}"),
                Condition("Progressing", False, "Ready", "model loaded"),
                Condition("Degraded", False, "AsExpected"))
    if p.state is State.STARTING:
        what = "re-attached to running llama-server" if p.adopted else "llama-server is loading the model"
        return ("Progressing",
                Condition("Available", False, "ModelLoading", f"{what} (pid {p.pid})"),
                Condition("Progressing", True, "ModelLoading", what),
                Condition("Degraded", False, "AsExpected"))
    if p.state is State.UNHEALTHY:
        return ("Progressing",
                Condition("Available", False, "Unhealthy", "llama-server does not answer /health"),
                Condition("Progressing", False, "Unhealthy", "waiting for /health to recover before restarting"),
                Condition("Degraded", True, "Unhealthy", "llama-server does not answer /health"))
    if p.state is State.BACKOFF:
        exit_reason = p.last_exit.reason.value if p.last_exit else "ProcessExited"
        exit_message = p.last_exit.describe() if p.last_exit else "llama-server exited"
        restart = f"restart #{p.restarts} pending after back-off"
        return ("Failed",
                Condition("Available", False, exit_reason, exit_message),
                Condition("Progressing", False, "CrashLoopBackOff", restart),
                Condition("Degraded", True, "CrashLoopBackOff", f"{restart}: {exit_message}"))
    return ("Stopped",
            Condition("Available", False, "Stopped", "llama-server is not running"),
            Condition("Progressing", False, "Stopped", ""),
            Condition("Degraded", False, "AsExpected"))


def compute_status(inputs: StatusInputs, previous: dict | None, now: str) -> dict:
    """The status object to write (without `lastUpdated`, which the writer stamps)."""
    p = inputs.process
    running = p is not None and p.state is not State.STOPPED
    errors = "; ".join(inputs.spec_errors)

    if running:
        phase, available, progressing, degraded = _process_conditions(p)
        if inputs.spec_errors:
            degraded = Condition("Degraded", True, "InvalidSpec",
                                 f"still serving the last valid spec; the current spec is invalid: {errors}")
        elif inputs.degraded is not None:
            degraded = Condition("Degraded", True, inputs.degraded.reason, inputs.degraded.message)
    elif inputs.spec_errors:
        phase = "Failed"
        available = Condition("Available", False, "InvalidSpec", errors)
        progressing = Condition("Progressing", False, "InvalidSpec", "fix the spec; nothing was started")
        degraded = Condition("Degraded", True, "InvalidSpec", errors)
    elif not inputs.wants_process:
        phase = "Suspended" if inputs.suspended else "Stopped"
        why = "spec.suspend is true" if inputs.suspended else "spec.replicas is 0"
        available = Condition("Available", False, phase, why)
        progressing = Condition("Progressing", False, phase, why)
        degraded = Condition("Degraded", False, "AsExpected")
    elif inputs.blocker is not None:
        b = inputs.blocker
        phase = b.phase
        available = Condition("Available", False, b.reason, b.message)
        progressing = Condition("Progressing", False, b.reason, b.message)
        degraded = Condition("Degraded", b.phase == "Failed", b.reason if b.phase == "Failed" else "AsExpected",
                             b.message if b.phase == "Failed" else "")
    else:
        phase = "Creating"
        available = Condition("Available", False, "Creating", "preparing to start llama-server")
        progressing = Condition("Progressing", True, "Creating", "preparing to start llama-server")
        degraded = Condition("Degraded", False, "AsExpected")

    ready = 1 if running and p.state is State.READY else 0
    status: dict = {
        "phase": phase,
        "readyReplicas": ready,
        "replicas": 1 if running else 0,
        "desiredReplicas": 1 if inputs.wants_process else 0,
        "conditions": merge_conditions((previous or {}).get("conditions"),
                                       [available, progressing, degraded, *filter(None, [inputs.memory_pressure])],
                                       now, inputs.generation),
    }
    if inputs.generation is not None:
        status["observedGeneration"] = inputs.generation
    if inputs.endpoint:
        status["endpoint"] = inputs.endpoint
    if inputs.spec_hash:
        status["specHash"] = inputs.spec_hash
    if inputs.scheduling is not None:
        status["schedulingStatus"], status["schedulingMessage"] = inputs.scheduling
    if running and p.acceleration is not None:
        status["acceleration"] = p.acceleration.as_status()
    return status
