"""The reconcile: make each InferenceService's process match its spec.

Level-triggered: every event (spec or Model change, process transition,
resync) only queues the service's key (`controller.intake`); `reconcile(key)`
then looks at the whole picture (cached objects, supervised process) and does
what is missing, and returns whether to look again (`controller.results`).
It never waits on a model load or a download, so keys stay independent. It
neither owns the work queue nor knows who feeds it (`controller.runner`).

Rules that protect users' models:
- An invalid spec never spawns anything; if the service runs, it keeps its
  last valid spec, marked Degraded/InvalidSpec, until the next valid change.
- A Model that disappears from a synced cache while its service runs keeps
  the process (Degraded/ModelNotFound): deleting a Model by mistake or
  re-creating it is not an outage. A Model that changes hands (accelerator
  no longer metal) stops it.
- A changed spec hash respawns exactly once, stopping the old process first
  so two copies of a model never share the Mac's memory; when the new
  model must first be downloaded, the old process serves until it is there.

What the status then says, and when it is written, is `StatusReporter`'s;
the Service and EndpointSlice writes are the `Publisher`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import structlog

from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import Informer
from metal_agent.adapters.model_files import ModelFiles, ModelPending, ModelReady
from metal_agent.adapters.model_roots import workload_refusals
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.adapters.process.supervisor import LaunchPlan
from metal_agent.controller.publishing import HostAddress, Publisher
from metal_agent.controller.rebind import Rebinder
from metal_agent.controller.results import BLOCKED_RETRY, DONE, DRAFT_DOWNLOAD_RETRY, Done, Requeue, Result
from metal_agent.controller.status_reporter import StatusReporter
from metal_agent.controller.gate import EVERY_SERVICE, Gate
from metal_agent.controller.on_demand import OnDemand
from metal_agent.controller.rollout import Rollouts
from metal_agent.core.claim import evaluate, wanted_draft, wanted_model
from metal_agent.core.engine import Engine
from metal_agent.core.engine_name import EngineName
from metal_agent.core.engines import engine_for
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.process import Snapshot, State
from metal_agent.core.result import FieldError, Invalid, NotOurs
from metal_agent.core.spec_hash import spec_hash
from metal_agent.core.spec_policy import spec_reason
from metal_agent.core.status import Blocker
from metal_agent.core.workload import Workload
from metal_agent.memory.guard import MemoryGuard, Waiting
from metal_agent.memory.state import MemoryState
from metal_agent.metrics import AgentMetrics, service_labels

log = structlog.get_logger(__name__)


@dataclass
class Managed:
    """A service this agent runs, with the spec it runs it for."""

    workload: Workload
    spec_hash: str
    uid: str


class Reconciler:
    def __init__(
        self,
        *,
        isvcs: Informer,
        models: Informer,
        processes: ProcessManager,
        model_files: ModelFiles,
        memory: MemoryGuard,
        reporter: StatusReporter,
        publisher: Publisher,
        events: EventRecorder,
        metrics: AgentMetrics,
        launch: LaunchSettings,
        wake: Callable[[Iterable[str]], None],
        managed: dict[str, Managed] | None = None,
        pressure: MemoryState | None = None,
        gate: Gate = EVERY_SERVICE,
        rebind: Rebinder | None = None,
        on_demand: OnDemand | None = None,
        rollouts: Rollouts | None = None,
    ) -> None:
        """`managed`: the table of running services the pressure responder also reads;
        `pressure`: what memory pressure means for each service (the responder writes it);
        `wake(keys)`: reconcile those keys again (memory freed by a stop); `publisher.address`
        is where engines bind; `rebind`: with the front door, moves engines an older agent left on the
        Mac's address onto loopback one at a time (until then they serve where they are);
        `on_demand`: who sleeps (load on demand, the front door's); `rollouts`: what holds a changed
        spec back, and when a process is due for recycling."""
        self.rebind = rebind
        self.gate = gate  # services it refuses are another Mac's (or off the allowlist): not ours, their objects stay
        self.isvcs = isvcs
        self.models = models
        self.processes = processes
        self.model_files = model_files
        self.memory = memory
        self.reporter = reporter
        self.publisher = publisher
        self.address: HostAddress = publisher.address
        self.events = events
        self.metrics = metrics
        self.launch = launch
        self.wake = wake
        self.managed: dict[str, Managed] = {} if managed is None else managed
        self.pressure = MemoryState() if pressure is None else pressure
        self.on_demand = on_demand or OnDemand(enabled=False, events=events, isvcs=isvcs.cache, running=self.managed)
        self.rollouts = rollouts or Rollouts(model_files=model_files, events=events, enqueue_after=lambda k, d: None)
        self._waiting_reported: dict[str, str] = {}
        self._invalid_reported: dict[str, tuple] = {}

    @property
    def synced(self) -> bool:
        # A fleet gate is ready once it knows which replicas this Mac holds.
        return self.isvcs.synced.is_set() and self.models.synced.is_set() and self.gate.ready()

    async def reconcile(self, key: str) -> Result:
        if not self.synced:
            # An empty cache is not "everything was deleted": until the first full list,
            # processes run as recorded and nothing is decided (the first sync queues all).
            return Done("caches not synced")
        raw = self.isvcs.get(key)
        if raw is None:
            return await self._deleted(key)
        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        verdict = evaluate(raw, model_raw, self.gate, self.launch.default_engine, self._draft_raw(raw),
                           self.launch.policy, self.launch)
        if not isinstance(verdict, NotOurs | Invalid) and (refused := self._source_refusals(verdict.value, model_raw)):
            verdict = Invalid(refused)
        if isinstance(verdict, NotOurs):
            return await self._not_ours(key, raw, verdict, ref, model_raw)
        if isinstance(verdict, Invalid):
            return await self._invalid(key, raw, verdict)
        self._invalid_reported.pop(key, None)
        workload = verdict.value
        if not workload.isvc.spec.wants_process:
            self.on_demand.forget(key)  # scaled to zero: no longer asleep or loading, its route answers 503
            if self.managed.get(key) is not None:
                log.info("scaled to zero or suspended; stopping llama-server", service=key)
                await self._stop(key)
            await self.publisher.withdraw(key)
            await self._write_status(key, raw, False, suspended=workload.isvc.spec.suspend)
            return DONE
        return await self._serve(key, raw, workload)

    async def _deleted(self, key: str) -> Done:
        if self.managed.get(key) is not None or self.processes.get(key):
            log.info("InferenceService deleted; stopping llama-server", service=key)
            await self._stop(key)
        await self.publisher.unregister(key)
        self._forget(key)
        return DONE

    async def _serve(self, key: str, raw: dict, workload: Workload) -> Result:
        """A valid spec that wants a process: keep, replace or start it, then publish it."""
        on_demand_problem = self.on_demand.read(key, raw)
        running = self.processes.get(key) is not None
        if self.on_demand.is_asleep(key) or await self.on_demand.slept_before(key, running=running):
            if not running or await self.on_demand.confirm_sleep(key):
                return await self._asleep(key, raw, workload)
        digest = spec_hash(workload).value
        uid = raw["metadata"].get("uid") or ""
        managed = await self._take_over(key, workload, digest, uid)
        running = self.processes.get(key)
        moved = running is not None and not self._in_place(key, running)
        if managed is not None and (managed.spec_hash != digest or managed.uid != uid or moved):
            if managed.uid == uid and not moved and key not in self.pressure.evicted:
                deferred = await self.rollouts.hold(key, raw, workload, digest)
                if deferred is not None:
                    # Make before break: the running process keeps serving the previous spec
                    # until the new model is on disk (a download can take hours), or idle.
                    problem, retry = await self.publisher.register(key, raw, self.processes.get(key))
                    await self._write_status(key, raw, True, degraded=problem or deferred.failed,
                                             rollout=deferred.pending)
                    if deferred.failed:
                        return Requeue(BLOCKED_RETRY, "the changed spec's model cannot be had")
                    if deferred.retry is not None:
                        return Requeue(deferred.retry, "waiting for idle before respawning")
                    return _registration_result(retry)
            why = (f"spec changed (hash {managed.spec_hash[:12]} -> {digest[:12]})" if managed.spec_hash != digest
                   else f"it must listen on {self.address.bind}" if moved else "the service was re-created")
            log.info("respawning llama-server", service=key, why=why)
            self.events.emit(raw["metadata"], "Respawning", f"{why}; restarting llama-server")
            self.metrics.respawns.labels(**service_labels(key)).inc()
            await self._stop(key)
            managed = None
        managed = await self._stop_if_must(key, raw, managed)
        if managed is None:
            blocked = await self._start_if_admitted(key, raw, workload, digest, uid)
            if blocked is not None:
                return blocked
        elif not self.memory.counts(key):
            # Taken over while its downloaded file was being re-verified (the store re-queues
            # the key when that ends): what it holds counts against others from now on.
            await self._commit_running(key, workload)
        problem, retry = await self.publisher.register(key, raw, self.processes.get(key))
        await self._write_status(key, raw, True, degraded=problem or on_demand_problem)
        return _registration_result(retry)

    async def _asleep(self, key: str, raw: dict, workload: Workload) -> Result:
        """Unloaded on demand (idle, or for another's memory): no process, and the slice stays
        ready on the front door's port, which holds a request and wakes the model."""
        if self.managed.get(key) is not None or self.processes.get(key) is not None:
            await self._stop(key)
        problem, retry = await self.publisher.register(key, raw, None, runtime=self._engine(workload).runtime_label)
        await self._write_status(key, raw, True, degraded=problem)
        return _registration_result(retry)

    async def _take_over(self, key: str, workload: Workload, digest: str, uid: str) -> Managed | None:
        """A process run as recorded (from start-up, or while the spec was invalid) is taken
        over if it runs this very spec; otherwise it is replaced like any changed spec."""
        managed = self.managed.get(key)
        kept = self.processes.get(key)
        if managed is not None or kept is None:
            return managed
        managed = self.managed[key] = Managed(workload, kept.plan.spec_hash, kept.plan.uid)
        if self._slots_open(kept):
            # Started by an agent from before --no-slots: /slots shows prompts to any client.
            log.warning("respawning: the running llama-server serves /slots", service=key)
            managed = self.managed[key] = Managed(workload, "", kept.plan.uid)
        elif (kept.plan.spec_hash, kept.plan.uid) == (digest, uid) and self._in_place(key, kept):
            log.info("took over the running llama-server", service=key, pid=kept.snapshot.pid)
            await self._commit_running(key, workload)
        return managed

    def _in_place(self, key: str, sup) -> bool:
        """Its engine listens where engines should, or keeps serving where it is until its turn
        to move behind the front door (controller/rebind.py)."""
        return sup.plan.host == self.address.bind or (self.rebind is not None and self.rebind.defers(key))

    async def _stop_if_must(self, key: str, raw: dict, managed: Managed | None) -> Managed | None:
        """A supervisor that failed internally is restarted; an evicted service is stopped; one
        past its maxPodLifetimeSeconds is recycled."""
        failed = self.processes.get(key)
        if failed is not None and failed.failed is not None:
            log.warning("restarting supervision after an internal error", service=key)
            await self._stop(key)
            managed = None
        if managed is not None and key in self.pressure.evicted:
            log.warning("evicted: stopping llama-server to relieve memory pressure", service=key)
            await self._stop(key)
            managed = None
        if managed is not None and await self.rollouts.must_recycle(key, raw, managed.workload, self.processes.get(key)):
            await self._stop(key)
            managed = None
        return managed

    async def _start_if_admitted(self, key: str, raw: dict, workload: Workload, digest: str,
                                 uid: str) -> Result | None:
        """Start the service if its model (and draft) are on disk, its engine is installed and
        memory admits it; otherwise say why in status and return when to look again."""
        found = self.model_files.lookup(workload.model, key, secret_ref=workload.model.spec.source_secret_ref)
        if isinstance(found, Blocker):
            await self._blocked(key, raw, blocker=found)
            return Requeue(BLOCKED_RETRY, found.reason)
        if isinstance(found, ModelPending):
            await self._blocked(key, raw, blocker=Blocker("ModelDownloading", found.message, phase="Creating"))
            return Done("the download store re-queues the key on progress and when done")
        draft = self._draft_lookup(workload)
        if isinstance(draft, Blocker):
            await self._blocked(key, raw, blocker=draft)
            if draft.reason == "ModelDownloading":
                return Requeue(DRAFT_DOWNLOAD_RETRY, "the draft model is downloading")
            return Requeue(BLOCKED_RETRY, draft.reason)
        if missing := self._engine_missing(workload):
            await self._blocked(key, raw, blocker=missing)
            return Done("the engine is not installed; the agent restarts when it is")
        admission = await self.memory.check(key, workload, found.path, draft.path if draft else None)
        if isinstance(admission, Waiting) and await self._make_room(key, admission):
            admission = await self.memory.check(key, workload, found.path, draft.path if draft else None)
        if isinstance(admission, Waiting):
            self._report_waiting(key, raw, admission)
            await self._blocked(key, raw, blocker=admission.blocker, scheduling=admission.scheduling)
            return Done("re-queued when memory is freed or pressure clears")
        self._waiting_reported.pop(key, None)
        await self._start(key, workload, digest, uid, found, draft)
        return None

    async def _make_room(self, key: str, waiting: Waiting) -> bool:
        """Memory is short: unload the least recently used idle on-demand models, if that is enough."""
        def protected(k: str) -> bool:
            m = self.managed.get(k)
            return m is None or m.workload.isvc.spec.eviction_protection

        chosen = await self.on_demand.make_room(key, waiting.shortfall_bytes, dict(self.memory.committed), protected)
        stopped = False
        for victim in chosen:
            if await self.on_demand.confirm_sleep(victim):
                await self._stop(victim)
                stopped = True
        return stopped

    async def _blocked(self, key: str, raw: dict, **facts) -> None:
        """Nothing may serve `key` now: withdraw its slice and say why."""
        await self.publisher.withdraw(key)
        await self._write_status(key, raw, True, **facts)

    async def _stop(self, key: str) -> None:
        if self.processes.get(key) is not None:
            await self.publisher.mark_not_ready(key)
        self.managed.pop(key, None)
        await self.processes.stop(key)
        self.metrics.process_healthy.labels(**service_labels(key)).set(0)
        self.wake(self.memory.release(key))  # memory freed: those waiting may fit now

    async def _not_ours(self, key: str, raw: dict, verdict: NotOurs, ref: tuple[str, str] | None,
                        model_raw: dict | None) -> Done:
        """Not (or no longer) a service this Mac serves: stop what runs, unless only its Model
        vanished (a deleted Model is not an outage), and speak for an unplaced fleet service."""
        managed = self.managed.get(key)
        if (unplaced := self.gate.unplaced(key)) and managed is None and self.processes.get(key) is None:
            # Fleet: no Mac can take it, and this one speaks for it (metal_agent/fleet/gate.py).
            await self._write_status(key, raw, True, blocker=unplaced, scheduling=(unplaced.reason, unplaced.message))
            return DONE
        model_missing = model_raw is None and ref is not None
        if model_missing and managed is None and self.processes.get(key) is None:
            # After an agent restart: the same rule as at run time, a vanished Model costs no reload.
            if self.processes.adopt_as_recorded(key, raw["metadata"].get("uid") or ""):
                log.info("kept the running llama-server although its Model is missing", service=key)
        if managed is None and self.processes.get(key) is None:
            return DONE
        if model_missing:
            await self._write_status(key, raw, managed.workload.isvc.spec.wants_process if managed else True,
                                     degraded=Blocker("ModelNotFound",
                                                      f"Model {ref[1]} was not found; still serving the last valid spec"))
            return DONE
        log.info("InferenceService is no longer ours; stopping llama-server", service=key, why=verdict.reason)
        await self._stop(key)
        await self.publisher.unregister(key)
        return DONE

    def _slots_open(self, kept) -> bool:
        """Does a process the agent found running (from an older agent) lack --no-slots?"""
        if not self.launch.dialect.no_slots or kept.plan.engine.name is not EngineName.LLAMA_SERVER:
            return False
        try:
            return "--no-slots" not in kept.plan.build_argv(kept.plan.port or 1)
        except Exception:  # noqa: BLE001 - an argv we cannot rebuild: leave the process to the usual rules
            return False

    def _source_refusals(self, workload: Workload, model_raw: dict | None) -> tuple[FieldError, ...]:
        """A local source outside the owner's model roots, or one LLMKube's controller refused."""
        return workload_refusals(workload, model_raw, self.launch.policy.model_roots)

    async def _invalid(self, key: str, raw: dict, verdict: Invalid) -> Done:
        """An invalid spec starts nothing and stops nothing: a running process keeps serving
        its last valid spec; the errors go to status and, once per change, to an Event.

        A spec refused for security (an extraArgs option that reaches beyond the model, or a
        model source outside the owner's roots: core.spec_policy) differs in one way: a process
        this agent did not start under its policy (left by a previous agent, perhaps an older
        version or a wider policy, recorded with this spec or an older one) is stopped and never
        adopted, because it may be serving the very hole the refusal closes. A process this
        agent started serves a spec it accepted, so it keeps serving, as for any invalid change."""
        managed = self.managed.get(key)
        errors = tuple(e.describe() for e in verdict.errors)
        reason = spec_reason(e.reason for e in verdict.errors)
        refused = any(e.security for e in verdict.errors)
        marker = (raw["metadata"].get("generation"), errors)
        if self._invalid_reported.get(key) != marker:
            self._invalid_reported[key] = marker
            log.warning("spec refused" if refused else "invalid spec", service=key, reason=reason,
                        errors=list(errors))
            self.events.emit(raw["metadata"], reason, "; ".join(errors), warning=True)
        if refused and managed is None:
            if self.processes.get(key) is not None or self.processes.has_record(key):
                log.warning("stopping a process this agent did not start: its spec is refused", service=key,
                            reason=reason)
                await self._stop(key)
            await self.publisher.withdraw(key)
            await self._write_status(key, raw, True, spec_errors=errors, spec_reason=reason)
            return DONE
        if managed is None and self.processes.get(key) is None:
            # After an agent restart: keep the previous agent's process serving its last valid spec.
            if self.processes.adopt_as_recorded(key, raw["metadata"].get("uid") or ""):
                log.info("kept the running llama-server of the last valid spec", service=key)
        wants = managed.workload.isvc.spec.wants_process if managed else True
        await self._write_status(key, raw, wants, spec_errors=errors, spec_reason=reason)
        return DONE

    async def _commit_running(self, key: str, workload: Workload) -> None:
        """A running process's memory counts against what others may start."""
        found = self.model_files.lookup(workload.model, key, secret_ref=workload.model.spec.source_secret_ref)
        draft = self._draft_lookup(workload)
        if isinstance(found, ModelReady) and not isinstance(draft, Blocker):
            await self.memory.commit_running(key, workload, found.path, draft.path if draft else None)

    def _report_waiting(self, key: str, raw: dict, waiting: Waiting) -> None:
        """One Event per distinct reason and message, not one per reconcile."""
        b = waiting.blocker
        if self._waiting_reported.get(key) != b.message:
            self._waiting_reported[key] = b.message
            log.warning("not starting: " + b.reason, service=key, why=b.message)
            self.events.emit(raw["metadata"], b.reason, b.message, warning=True)

    def _draft_raw(self, raw: dict) -> dict | None:
        ref = wanted_draft(raw)
        return self.models.get(f"{ref[0]}/{ref[1]}") if ref else None

    def _draft_lookup(self, workload: Workload) -> ModelReady | Blocker | None:
        """Where the workload's draft Model is (None: it has none), or why it cannot start yet."""
        if workload.draft is None:
            return None
        found = self.model_files.lookup(workload.draft, None, secret_ref=workload.draft.spec.source_secret_ref)
        name = workload.draft.meta.name
        if isinstance(found, ModelPending):
            return Blocker("ModelDownloading", f"draft model {name}: {found.message}", phase="Creating")
        if isinstance(found, Blocker):
            return Blocker(found.reason, f"draft model {name}: {found.message}", phase=found.phase)
        return found

    def _engine(self, workload: Workload) -> Engine:
        return engine_for(workload, EngineName(self.launch.default_engine))

    def _engine_missing(self, workload: Workload) -> Blocker | None:
        """The engine this Model's format calls for is not installed on this Mac."""
        engine = self._engine(workload)
        if self.launch.command(engine.name):
            return None
        return Blocker("RuntimeMissing", f"format {workload.model.spec.format.value} is served by {engine.display},"
                       " which this agent did not find: pip install mlx-lm into the agent's venv (or pass"
                       " --mlx-server PATH) and restart the agent; other services are unaffected")

    async def _start(self, key: str, workload: Workload, digest: str, uid: str, found: ModelReady,
                     draft: ModelReady | None = None) -> None:
        # Bound where this Mac's address is now (it may have moved since start-up).
        launch, host = replace(self.launch, host=self.address.bind), self.address.bind
        engine = self._engine(workload)

        def argv_for(port: int) -> tuple[str, ...]:
            return engine.argv(workload, launch, Instance(str(found.path), port, str(draft.path) if draft else None))

        plan = LaunchPlan(key=key, uid=uid, spec_hash=digest, host=host, build_argv=argv_for, engine=engine)
        self.managed[key] = Managed(workload, digest, uid)
        await self.processes.start(plan)
        self.on_demand.started(key)

    def _forget(self, key: str) -> None:
        self.model_files.forget(key)
        self.memory.forget(key)
        self.pressure.evicted.discard(key)
        self._waiting_reported.pop(key, None)
        self.rollouts.forget(key)
        self._invalid_reported.pop(key, None)
        self.reporter.forget(key)
        self.publisher.forget(key)
        self.on_demand.forget(key)
        namespace, name = key.split("/", 1)
        self.metrics.forget_service(namespace, name)

    async def _write_status(self, key: str, raw: dict, wants_process: bool, **facts) -> None:
        """Tell the StatusReporter what is true of `key` (see its `write` for `facts`)."""
        supervisor = self.processes.get(key)
        managed = self.managed.get(key)
        registered = self.publisher.registered(key)
        idle, loading = self.on_demand.notes(key, supervisor is not None and supervisor.snapshot.ready)
        await self.reporter.write(
            key, raw, wants_process,
            process=self._snapshot(supervisor),
            endpoint=self.publisher.endpoint_for(key, raw, managed.workload.isvc.spec.mode.value if managed else "chat")
            if supervisor else None,
            serving=supervisor is not None and supervisor.snapshot.ready and registered,
            memory_pressure=self.pressure.condition(key),
            gpu_layers=managed.workload.model.spec.hardware.gpu.layers if managed else 0,
            idle=idle, loading=loading, **facts,
        )

    @staticmethod
    def _snapshot(supervisor) -> Snapshot | None:
        """A supervisor that has not spawned yet is starting, not stopped (stopped ones are
        dropped): said once, it spares a status write a few milliseconds later."""
        if supervisor is None:
            return None
        snap = supervisor.snapshot
        return replace(snap, state=State.STARTING) if snap.state is State.STOPPED else snap


def _registration_result(retry: float | None) -> Result:
    return Requeue(retry, "registration refused or failed") if retry is not None else DONE
