"""InferenceService status from what the agent knows, as one pure function.

Status is the user's only window onto a process on someone's Mac, so it must
say exactly what is true: loading is not ready, a crash loop is not
"progressing", and a typo in a running service's spec is a degraded service
still serving its last good spec, not an outage.

What the agent may write depends on who else writes (see `status_owner`):
- shared with LLMKube's controller: only what LLMKube's own Go agent writes
  (the Stopped/Suspended phase, the scheduling fields, `acceleration`) plus
  condition types of our own, which the controller keeps: `MetalProcessReady`
  (is the Mac's llama-server serving, and if not, why: its stderr line, the
  crash loop, the download, the memory wait) and `MetalSpecAccepted` (an
  invalid spec, or a Model LLMKube refuses, with the fix);
- alone (CRDs only): the whole status, in LLMKube's formats, so tools written
  for LLMKube read it the same way.

The result is the agent's *intent*: the writer applies it with server-side
apply, so a field left out is a field the agent gives up, and zero values are
left out (LLMKube's status fields are `omitempty`: a written 0 would differ
from what its controller writes and start a tug of war).
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.core.conditions import Condition, merge_conditions
from metal_agent.core.process import Snapshot, State

PROCESS_READY = "MetalProcessReady"
SPEC_ACCEPTED = "MetalSpecAccepted"
MEMORY_PRESSURE = "MemoryPressure"
FLEET_PLACEMENT = "FleetPlacement"
API_KEY_READY = "MetalApiKeyReady"  # the front door: can the service's named Secret of API keys be used
AGENT_CONDITIONS = (PROCESS_READY, SPEC_ACCEPTED, MEMORY_PRESSURE, FLEET_PLACEMENT, API_KEY_READY)


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
    desired_replicas: int = 1  # spec.replicas (LLMKube is Ready only when ready endpoints reach it)
    spec_errors: tuple[str, ...] = ()  # every problem in the current spec; empty when valid
    spec_reason: str = "InvalidSpec"  # the reason for spec_errors: ExtraArgRefused/SourceNotAllowed are refusals
    blocker: Blocker | None = None
    process: Snapshot | None = None
    endpoint: str | None = None
    degraded: Blocker | None = None  # a problem a running process survives (e.g. its Model vanished)
    # A changed spec being prepared (its model downloading) while the running process keeps
    # serving the previous one: a rollout in progress, not a problem with the spec.
    rollout: Blocker | None = None
    scheduling: tuple[str, str] | None = None  # LLMKube's schedulingStatus/schedulingMessage (memory admission)
    memory_pressure: Condition | None = None
    model_not_accepted: Blocker | None = None  # LLMKube's Model controller has not marked the Model Ready
    shared: bool = False  # LLMKube's controller owns the rest of status
    # The Model's spec.hardware.gpu.layers (0: all, -1: auto, N: that many): a partial
    # offload of exactly the N layers asked for is not a memory shortfall.
    gpu_layers: int = 0
    # Load on demand (core/on_demand.py): why the model sleeps (unloaded, the slice still
    # ready: the front door answers for it) or why it is being loaded.
    idle: str | None = None
    loading: str | None = None
    # Fleet mode (metal_agent/fleet/): the replicas ready on other Macs, and the condition
    # saying which Macs serve the service (`FleetPlacement`), written by one Mac for all.
    ready_elsewhere: int = 0
    placement: Condition | None = None
    api_key: Condition | None = None  # MetalApiKeyReady, for a service naming a Secret of API keys


def _process_condition(inputs: StatusInputs) -> Condition:
    """`MetalProcessReady`: the plain truth about the llama-server on this Mac."""
    p = inputs.process
    if p is not None and p.state is not State.STOPPED:
        if p.state is State.READY:
            serving = f"{p.server} is serving on port {p.port}"
            if inputs.rollout is not None:
                serving += f" (the previous spec, until the new one is ready: {inputs.rollout.message})"
            shortfall = _offload_shortfall(inputs)
            return Condition(PROCESS_READY, True, "Ready", f"{shortfall}; {serving}" if shortfall else serving)
        if p.state is State.STARTING:
            # No pid here: a spawn would then be two writes (before and after the pid is known).
            what = f"re-attached to running {p.server}" if p.adopted else f"{p.server} is loading the model"
            if inputs.loading and not p.adopted:
                return Condition(PROCESS_READY, False, "LoadingOnDemand", f"{what} on demand: {inputs.loading}")
            return Condition(PROCESS_READY, False, "ModelLoading", what)
        if p.state is State.UNHEALTHY:
            return Condition(PROCESS_READY, False, "Unhealthy", f"{p.server} does not answer /health")
        exit_message = p.last_exit.describe() if p.last_exit else f"{p.server} exited"
        return Condition(PROCESS_READY, False, "CrashLoopBackOff",
                         f"restart #{p.restarts} pending after back-off: {exit_message}")
    if inputs.spec_errors:
        if _refused(inputs):
            return Condition(PROCESS_READY, False, inputs.spec_reason,
                             f"nothing is served: the spec is refused ({inputs.spec_reason}, see {SPEC_ACCEPTED})")
        return Condition(PROCESS_READY, False, "InvalidSpec", "nothing was started: the spec is invalid")
    if not inputs.wants_process:
        phase = "Suspended" if inputs.suspended else "Stopped"
        return Condition(PROCESS_READY, False, phase, _stopped_why(inputs))
    if inputs.idle is not None:
        return Condition(PROCESS_READY, False, "Idle", inputs.idle)
    if inputs.blocker is not None:
        return Condition(PROCESS_READY, False, inputs.blocker.reason, inputs.blocker.message)
    return Condition(PROCESS_READY, False, "Creating", "preparing to start llama-server")


def _offload_shortfall(inputs: StatusInputs) -> str:
    """Why a serving process is slower than it should be: only part of the model is on the GPU.

    With `gpu.layers: -1` (auto) llama.cpp fits the layers to the memory the
    GPU may use and runs the rest on the CPU, so a partial offload means this
    Mac is short of memory. With a count (999 for "all") llama.cpp loads what
    was asked (see `Acceleration.partial`), so a partial offload below the
    count asked for comes from elsewhere (an `-ngl` in `extraArgs`, a build
    that clamps); it is still worth a word. Reaching the count asked for is
    not. It still serves, so the process stays Ready; the message says what
    is wrong.
    """
    accel = inputs.process.acceleration if inputs.process else None
    if accel is None or not accel.partial:
        return ""
    if inputs.gpu_layers > 0 and accel.layers_offloaded >= inputs.gpu_layers:
        return ""
    return accel.shortfall()


def _spec_condition(inputs: StatusInputs) -> Condition:
    """`MetalSpecAccepted`: is there anything in the user's objects to fix?"""
    running = inputs.process is not None and inputs.process.state is not State.STOPPED
    if inputs.spec_errors:
        errors = "; ".join(inputs.spec_errors)
        prefix = "still serving the last valid spec; " if running else ""
        if _refused(inputs):
            return Condition(SPEC_ACCEPTED, False, inputs.spec_reason, f"{prefix}the current spec is refused: {errors}")
        return Condition(SPEC_ACCEPTED, False, "InvalidSpec", f"{prefix}the current spec is invalid: {errors}")
    if inputs.model_not_accepted is not None:
        return Condition(SPEC_ACCEPTED, False, inputs.model_not_accepted.reason, inputs.model_not_accepted.message)
    if inputs.degraded is not None:
        return Condition(SPEC_ACCEPTED, False, inputs.degraded.reason, inputs.degraded.message)
    return Condition(SPEC_ACCEPTED, True, "Accepted", "")


def _refused(inputs: StatusInputs) -> bool:
    """A refusal by the owner's policy (core.spec_policy), not a mistake in the spec."""
    return inputs.spec_reason != "InvalidSpec"


def _stopped_why(inputs: StatusInputs) -> str:
    return ("spec.suspend=true; metal-agent has stopped llama-server; spec.replicas preserved" if inputs.suspended
            else "spec.replicas=0; metal-agent has stopped llama-server")


def _full_conditions(inputs: StatusInputs, ready: int, desired: int) -> tuple[str, list[Condition]]:
    """Phase and LLMKube's own condition types, for when no controller writes them."""
    p = inputs.process
    running = p is not None and p.state is not State.STOPPED
    errors = "; ".join(inputs.spec_errors)
    process = _process_condition(inputs)
    if not running and inputs.spec_errors:
        return "Failed", [Condition("Available", False, inputs.spec_reason, errors),
                          Condition("Degraded", True, inputs.spec_reason, errors)]
    if not inputs.wants_process:
        phase = "Suspended" if inputs.suspended else "Stopped"
        reason = "Suspended" if inputs.suspended else "ManuallyScaledToZero"
        return phase, [Condition("Available", False, reason, _stopped_why(inputs))]
    if running and p.state is State.READY:
        phase = "Ready" if ready >= desired else "Progressing"
        conds = [Condition("Available", True, "InferenceReady", "Inference service is ready and serving requests")]
        if phase == "Progressing":
            conds.append(Condition("Progressing", True, "Creating", f"{ready}/{desired} replicas ready"))
        elif inputs.rollout is not None:
            conds.append(Condition("Progressing", True, inputs.rollout.reason,
                                   f"serving the previous spec until the new one is ready: {inputs.rollout.message}"))
        problem = inputs.spec_errors and (f"still serving the last valid spec; the current spec is"
                                          f" {'refused' if _refused(inputs) else 'invalid'}: {errors}")
        if problem or inputs.degraded is not None:
            reason = inputs.spec_reason if problem else inputs.degraded.reason
            conds.append(Condition("Degraded", True, reason, problem or inputs.degraded.message))
        elif shortfall := _offload_shortfall(inputs):
            conds.append(Condition("Degraded", True, "PartialOffload", shortfall))
        return phase, conds
    if running and p.state is State.BACKOFF:
        exit_reason = p.last_exit.reason.value if p.last_exit else "ProcessExited"
        return "Failed", [Condition("Available", False, exit_reason, process.message),
                          Condition("Degraded", True, "CrashLoopBackOff", process.message)]
    if running:
        degraded = [Condition("Degraded", True, "Unhealthy", process.message)] if p.state is State.UNHEALTHY else []
        return "Progressing", [Condition("Available", False, process.reason, process.message),
                               Condition("Progressing", True, process.reason, process.message), *degraded]
    if inputs.idle is not None:
        # Its slice stays ready: a request is answered (after a load), so it is available.
        return "Ready", [Condition("Available", True, "Idle", inputs.idle)]
    if inputs.blocker is not None:
        b = inputs.blocker
        conds = [Condition("Available", False, b.reason, b.message)]
        if b.phase == "Failed":
            conds.append(Condition("Degraded", True, b.reason, b.message))
        else:
            conds.append(Condition("Progressing", True, b.reason, b.message))
        return b.phase, conds
    return "Creating", [Condition("Available", False, "Creating", process.message),
                        Condition("Progressing", True, "Creating", process.message)]


# LLMKube's condition types: in full mode the agent sets the ones that apply and
# removes the others, as LLMKube's controller does.
LLMKUBE_CONDITIONS = ("Available", "Progressing", "Degraded")


def compute_status(inputs: StatusInputs, previous: dict | None, now: str) -> dict:
    """The status fields the agent applies (without `lastUpdated`, which the writer stamps)."""
    p = inputs.process
    running = p is not None and p.state is not State.STOPPED
    agent = [_process_condition(inputs), _spec_condition(inputs),
             *filter(None, [inputs.memory_pressure, inputs.placement, inputs.api_key])]
    old = [c for c in (previous or {}).get("conditions") or [] if isinstance(c, dict)]
    status: dict = {}

    if inputs.shared:
        if not inputs.wants_process and not running:
            status["phase"] = "Suspended" if inputs.suspended else "Stopped"
        wanted = agent
    else:
        serves = running and p.state is State.READY or not running and inputs.idle is not None
        ready = (1 if serves else 0) + inputs.ready_elsewhere
        desired = max(0, inputs.desired_replicas) if inputs.wants_process else 0
        phase, standard = _full_conditions(inputs, ready, desired)
        status["phase"] = phase
        if ready:
            status["readyReplicas"] = ready
        if desired:
            status["replicas"] = status["desiredReplicas"] = desired
        if inputs.endpoint:
            status["endpoint"] = inputs.endpoint
        wanted = [*standard, *agent]

    own = {c.type for c in wanted}
    status["conditions"] = [c for c in merge_conditions(old, wanted, now, inputs.generation) if c.get("type") in own]
    if inputs.scheduling is not None:
        status["schedulingStatus"], status["schedulingMessage"] = inputs.scheduling
    # Otherwise the scheduling fields are left out (given up: a diagnosis of ours goes).
    # Applying "" here would blank LLMKube's "WaitingForMetalAgent" while it is true (no
    # Mac serves yet: a write of ours while the model loads) and LLMKube would write it
    # straight back. Once this Mac serves, the reporter blanks it inside the write that says
    # so, or clears it if it appears later (`status_owner.leftover_blanks`, `stale_scheduling`).
    if running and p.acceleration is not None:
        status["acceleration"] = p.acceleration.as_status()
    return status
