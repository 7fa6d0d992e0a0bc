"""Apply the status fields this agent owns, once per change of what they mean.

The reconciler decides *what is true* of a service (its process, why it is
not running, what is wrong with its spec); this module turns that into the
InferenceService's status and writes it, with the rules that make the agent
a good neighbour of LLMKube's controller:

- Ownership is decided per service (`core.status_owner`): in `shared` mode
  only the agent's own fields are applied, in `full` mode LLMKube's too.
- A write happens only when the agent's *intent* changes. The last applied
  intent is remembered; after a restart the object's own managedFields entry
  stands in for it, so the object changing around the agent never causes a
  write, and a condition's transition time never moves because a stale cache
  has not seen our last write yet.
- LLMKube's controller keeps its "waiting for the agent" scheduling status
  after the service is Ready; in shared mode that leftover is blanked in the
  write that reports the service served, or, if it appears later, cleared by
  a guarded merge patch.
- In a fleet only one Mac speaks for a service (`controller.gate.Gate.speaks_for`).
"""

from __future__ import annotations

from typing import Callable

import structlog

from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import Informer
from metal_agent.adapters.kube.status_writer import StatusWriter, already_applied, utc_now
from metal_agent.controller.gate import Gate
from metal_agent.core.claim import wanted_model
from metal_agent.core.conditions import Condition
from metal_agent.core.process import Snapshot
from metal_agent.core.status import Blocker, StatusInputs, compute_status
from metal_agent.core.status_owner import (StatusMode, decide, leftover_blanks, model_not_ready, shows_controller,
                                          stale_scheduling)
from metal_agent.metrics import AgentMetrics

log = structlog.get_logger(__name__)


class StatusReporter:
    def __init__(self, *, models: Informer, status: StatusWriter, events: EventRecorder, metrics: AgentMetrics,
                 gate: Gate, status_mode: StatusMode = StatusMode.AUTO,
                 api_key: Callable[[str], Condition | None] = lambda key: None) -> None:
        """`api_key(key)`: the front door's MetalApiKeyReady for the service (controller/access.py)."""
        self.api_key = api_key
        self._api_key_reported: dict[str, Condition] = {}
        self.models = models
        self.status = status
        self.events = events
        self.metrics = metrics
        self.gate = gate
        self.status_mode = status_mode
        self.controller_seen = False  # some object showed LLMKube's controller writing status
        self._applied: dict[str, dict] = {}  # our last applied status intent, per key
        self._ownership: dict[str, str] = {}  # per key: "full" or "shared", to log changes once
        self._model_not_ready_reported: dict[str, str] = {}

    def forget(self, key: str) -> None:
        self._applied.pop(key, None)
        self._ownership.pop(key, None)
        self._model_not_ready_reported.pop(key, None)
        self._api_key_reported.pop(key, None)

    async def write(
        self, key: str, raw: dict, wants_process: bool, *, process: Snapshot | None, endpoint: str | None,
        serving: bool, memory_pressure: Condition, gpu_layers: int = 0, suspended: bool = False,
        spec_errors: tuple[str, ...] = (), spec_reason: str = "InvalidSpec", blocker: Blocker | None = None, degraded: Blocker | None = None,
        scheduling: tuple[str, str] | None = None, rollout: Blocker | None = None,
        idle: str | None = None, loading: str | None = None,
    ) -> None:
        """Apply what is true of `key` now. `serving`: its process is ready and registered;
        `idle`/`loading`: why an on-demand model sleeps / is being loaded."""
        if not self.gate.speaks_for(key):
            self._applied.pop(key, None)  # when it is our turn again, the status may be another Mac's
            return  # fleet: another Mac serving this service writes its status
        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        self.controller_seen = self.controller_seen or shows_controller(raw, model_raw)
        owner = decide(self.status_mode, raw, model_raw, controller_seen=self.controller_seen)
        if self._ownership.get(key) != owner.label:
            self._ownership[key] = owner.label
            log.info("status ownership", service=key, mode=owner.label, why=owner.why)
        not_ready = model_not_ready(model_raw) if owner.shared else None
        replicas = (raw.get("spec") or {}).get("replicas", 1)
        inputs = StatusInputs(
            generation=raw["metadata"].get("generation"),
            wants_process=wants_process,
            suspended=suspended,
            desired_replicas=replicas if isinstance(replicas, int) else 1,
            spec_errors=spec_errors,
            spec_reason=spec_reason,
            degraded=degraded,
            rollout=rollout,
            scheduling=scheduling,
            memory_pressure=memory_pressure,
            blocker=blocker,
            process=process,
            endpoint=endpoint,
            model_not_accepted=Blocker(*not_ready) if not_ready else None,
            gpu_layers=gpu_layers,
            idle=idle,
            loading=loading,
            shared=owner.shared,
            **dict(zip(("placement", "ready_elsewhere"), self.gate.placement(key))),
            api_key=self._api_key(key, raw),
        )
        cleared = owner.shared and scheduling is None and await self._clear_stale_scheduling(key, raw, serving)
        last = self._applied.get(key)
        # Our own conditions are what we last applied, whatever a stale cache says:
        # a transition time must not move because our write has not come back yet.
        intent = compute_status(inputs, last or raw.get("status"), utc_now())
        if last == intent or (last is None and already_applied(raw, intent, stamped=("lastUpdated",))):
            self._applied[key] = intent
            return
        if not_ready and self._model_not_ready_reported.get(key) != not_ready[1]:
            self._model_not_ready_reported[key] = not_ready[1]
            log.warning("LLMKube has not marked the Model Ready", service=key, why=not_ready[1])
            self.events.emit(raw["metadata"], "ModelNotReady", not_ready[1], warning=True)
        body = intent if owner.shared else {**intent, "lastUpdated": utc_now()}
        blanks = leftover_blanks(raw, serving=serving) if owner.shared and scheduling is None and not cleared else {}
        body = {**blanks, **body}
        namespace, name = key.split("/", 1)
        if await self.status.apply(namespace, name, body) is not None:
            self.metrics.status_writes.inc()
            log.debug("status applied", service=key, mode=owner.label, phase=intent.get("phase"),
                      conditions=[f"{c['type']}={c['status']}/{c['reason']}" for c in intent["conditions"]],
                      scheduling=intent.get("schedulingStatus"), first=last is None,
                      blanked=(raw.get("status") or {}).get("schedulingStatus") if blanks else None)
        self._applied[key] = intent

    def _api_key(self, key: str, raw: dict) -> Condition | None:
        """The condition, and an Event naming the Secret each time it turns bad or good again."""
        found = self.api_key(key)
        before = self._api_key_reported.get(key)
        if found is not None and found.status is False and (before is None or before != found):
            self.events.emit(raw["metadata"], found.reason, found.message, warning=True)
        elif found is not None and found.status and before is not None and before.status is False:
            self.events.emit(raw["metadata"], "ApiKeySecretReadable", found.message)
        if found is None:
            self._api_key_reported.pop(key, None)
        else:
            self._api_key_reported[key] = found
        return found

    async def _clear_stale_scheduling(self, key: str, raw: dict, serving: bool) -> bool:
        fields = stale_scheduling(raw, serving=serving)
        if not fields:
            return False
        namespace, name = key.split("/", 1)
        if not await self.status.clear(namespace, name, fields, raw["metadata"].get("resourceVersion") or ""):
            return False
        self.metrics.status_writes.inc()
        log.info("cleared LLMKube's stale agent-absent scheduling status", service=key,
                 was=(raw.get("status") or {}).get("schedulingStatus"))
        return True
