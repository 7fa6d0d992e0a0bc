"""The control loop: make each InferenceService's process match its spec.

Level-triggered: every event (spec or Model change, process transition,
resync) only queues the service's key; `reconcile(key)` then looks at the
whole picture (cached objects, supervised process) and does what is missing.
It never waits on a model load or a download, so keys stay independent.

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

What the status then says, and when it is written, is `StatusReporter`'s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import structlog

from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import Informer, object_key
from metal_agent.adapters.kube.registrar import NameTaken, Registrar
from metal_agent.adapters.kube.status_writer import StatusWriter
from metal_agent.adapters.memory_watchdog import process_rss
from metal_agent.adapters.model_files import ModelFiles, ModelPending, ModelReady
from metal_agent.adapters.model_roots import workload_refusals
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.adapters.process.supervisor import LaunchPlan
from metal_agent.core.engine import Engine, EngineName, Launch, engine_for
from metal_agent.core.backoff import Backoff
from metal_agent.core.claim import EVERY_SERVICE, Allowlist, Workload, evaluate, wanted_draft, wanted_model
from metal_agent.core.conditions import Condition
from metal_agent.core.flags import MlockStyle
from metal_agent.core.pressure import Level, ServiceMemory
from metal_agent.core.process import Snapshot, State, SupervisorEvent
from metal_agent.core.registration import (
    SERVICE_NAME_CONFLICT,
    Registration,
    conflict_message,
    endpoint_path,
    endpoint_url,
    service_name_problem,
)
from metal_agent.core.result import FieldError, Invalid, NotOurs, Parsed
from metal_agent.core.spec_policy import SpecPolicy, spec_reason
from metal_agent.core.spec_hash import spec_hash
from metal_agent.core.status import Blocker
from metal_agent.core.status_owner import StatusMode
from metal_agent.core.validation import parse_model
from metal_agent.memory_guard import MemoryGuard, Waiting
from metal_agent.metrics import AgentMetrics, service_labels
from metal_agent.status_reporter import StatusReporter
from metal_agent.workqueue import WorkQueue
from metal_agent.tasks import within

log = structlog.get_logger(__name__)

# A refused or failed Service/EndpointSlice write is retried soon, then less often.
REGISTRATION_BACKOFF = Backoff(initial=0.5, factor=2.0, cap=30.0, jitter=0.5)


@dataclass(frozen=True)
class LaunchSettings:
    """Agent-level inputs to every llama-server command line."""

    llama_server: str
    host: str = "127.0.0.1"
    threads: int | None = None
    mlock: bool = True
    mlock_style: MlockStyle = MlockStyle.FLAG
    verbosity_flag: str | None = None  # the binary's log-verbosity option (core.flags.Dialect)
    no_jinja: bool = True  # the binary knows --no-jinja
    register_address: str | None = None  # the address put in EndpointSlices; None: do not register
    mlx_server: tuple[str, ...] = ()  # how to start mlx_lm.server (adapters.mlx_binary.exec_form); (): none found
    default_engine: str = EngineName.LLAMA_SERVER.value  # serves Models whose format names no engine (`custom`)
    no_slots: bool = True  # pass --no-slots (core.flags.Dialect)
    policy: SpecPolicy = SpecPolicy()  # what the Mac's owner allows specs (extraArgs, model roots)

    def command(self, engine: Engine) -> tuple[str, ...]:
        """How to start `engine`'s server; () when it is not installed."""
        return {EngineName.LLAMA_SERVER: (self.llama_server,), EngineName.MLX_LM: self.mlx_server}[engine.name]


@dataclass
class _Managed:
    workload: Workload
    spec_hash: str
    uid: str


@dataclass(frozen=True)
class _Deferred:
    """A changed spec that cannot start yet while the previous one serves."""

    pending: Blocker | None = None  # its model is downloading
    failed: Blocker | None = None  # its model cannot be had (shown as a spec problem)


class Reconciler:
    def __init__(
        self,
        *,
        isvcs: Informer,
        models: Informer,
        processes: ProcessManager,
        model_files: ModelFiles,
        status: StatusWriter,
        events: EventRecorder,
        metrics: AgentMetrics,
        launch: LaunchSettings,
        memory: MemoryGuard,
        registrar: Registrar | None = None,
        concurrency: int = 8,
        status_mode: StatusMode = StatusMode.AUTO,
        allowlist: Allowlist = EVERY_SERVICE,
    ) -> None:
        self.allowlist = allowlist  # services off the list are another Mac's: not ours, and their objects stay
        self.isvcs = isvcs
        self.models = models
        self.processes = processes
        self.model_files = model_files
        self.events = events
        self.metrics = metrics
        self.launch = launch
        self.registrar = registrar if launch.register_address else None
        self.memory = memory
        self.pressure = Level.NORMAL
        self.evicted: set[str] = set()  # stopped by the watchdog; shown as MemoryPressure=Evicted
        self._waiting_reported: dict[str, str] = {}
        self._deferred_reported: dict[str, tuple[str, str]] = {}
        self._last_skip: str | None = None
        self._skip_message = ""  # why the watchdog did not evict, for MemoryPressure while the level lasts
        self.queue = WorkQueue(self.reconcile, concurrency=concurrency)
        self.managed: dict[str, _Managed] = {}
        self._invalid_reported: dict[str, tuple] = {}
        self.reporter = StatusReporter(models=models, status=status, events=events, metrics=metrics,
                                       allowlist=allowlist, status_mode=status_mode)
        self._registration_failures: dict[str, int] = {}
        self._conflict_reported: dict[str, str] = {}  # key -> the ServiceNameConflict message last sent as an Event

    # -- event intake -----------------------------------------------------

    def on_isvc_change(self, old: dict | None, new: dict | None) -> None:
        self.queue.add(object_key(new or old))

    def on_model_change(self, old: dict | None, new: dict | None) -> None:
        """A Model edit re-reconciles every InferenceService that refers to it."""
        model_key = object_key(new or old)
        if new is not None and old is not None:
            parsed = parse_model(new)
            if not isinstance(parsed, Invalid):
                self.model_files.retry(parsed.value)  # a fixed URL or sha256 must not wait out a remembered failure
        for isvc in self.isvcs.items():
            if model_key in {f"{ref[0]}/{ref[1]}" for ref in (wanted_model(isvc), wanted_draft(isvc)) if ref}:
                self.queue.add(object_key(isvc))

    def on_process_change(self, key: str, snap: Snapshot, event: SupervisorEvent | None) -> None:
        labels = service_labels(key)
        self.metrics.process_healthy.labels(**labels).set(1 if snap.ready else 0)
        self.metrics.managed_processes.set(len(self.processes.supervisors))
        if event is not None:
            if event.reason == "Restarting":
                self.metrics.process_restarts.labels(**labels).inc()
            if event.reason == "Ready" and snap.started_at and not snap.adopted:
                self.metrics.startup_seconds.observe(max(0.0, (snap.ready_at or 0) - snap.started_at))
            raw = self.isvcs.get(key)
            if raw is not None:
                self.events.emit(raw["metadata"], event.reason, event.message, warning=event.warning)
        self.queue.add(key)

    # -- reconcile --------------------------------------------------------

    async def reconcile(self, key: str) -> float | None:
        """The work queue's handler: reconcile `key`, counting outcomes for `reconciles_total`."""
        try:
            requeue = await self._reconcile(key)
        except Exception:
            self.metrics.reconciles.labels("error").inc()
            raise
        self.metrics.reconciles.labels("ok" if requeue is None else "requeue").inc()
        return requeue

    @property
    def synced(self) -> bool:
        # A fleet gate is ready once it knows which replicas this Mac holds.
        return self.isvcs.synced.is_set() and self.models.synced.is_set() and self.allowlist.ready()

    async def _reconcile(self, key: str) -> float | None:
        if not self.synced:
            # An empty cache is not "everything was deleted": until the first full list,
            # processes run as recorded and nothing is decided (see `resync_all`).
            return None
        raw = self.isvcs.get(key)
        managed = self.managed.get(key)
        if raw is None:
            if managed is not None or self.processes.get(key):
                log.info("InferenceService deleted; stopping llama-server", service=key)
                await self._stop(key)
            await self._unregister(key)
            self._forget(key)
            return None

        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        verdict = evaluate(raw, model_raw, self.allowlist, self.launch.default_engine, self._draft_raw(raw),
                           self.launch.policy)
        if not isinstance(verdict, NotOurs | Invalid) and (refused := self._source_refusals(verdict.value, model_raw)):
            verdict = Invalid(refused)

        if isinstance(verdict, NotOurs):
            return await self._not_ours(key, raw, verdict, ref, model_raw)
        if isinstance(verdict, Invalid):
            return await self._invalid(key, raw, verdict)
        self._invalid_reported.pop(key, None)

        workload = verdict.value
        spec = workload.isvc.spec
        if not spec.wants_process:
            if managed is not None:
                log.info("scaled to zero or suspended; stopping llama-server", service=key)
                await self._stop(key)
            await self._withdraw(key)
            await self._write_status(key, raw, False, suspended=spec.suspend)
            return None

        digest = spec_hash(workload).value
        uid = raw["metadata"].get("uid") or ""
        kept = self.processes.get(key)
        if managed is None and kept is not None:
            # Run as recorded (from start-up, or while the spec was invalid): take it over if it
            # runs this very spec, otherwise it is replaced like any changed spec.
            managed = self.managed[key] = _Managed(workload, kept.plan.spec_hash, kept.plan.uid)
            if self._slots_open(kept):
                # Started by an agent from before --no-slots: /slots shows prompts to any client.
                log.warning("respawning: the running llama-server serves /slots", service=key)
                managed = self.managed[key] = _Managed(workload, "", kept.plan.uid)
            elif (kept.plan.spec_hash, kept.plan.uid, kept.plan.host) == (digest, uid, self.launch.host):
                log.info("took over the running llama-server", service=key, pid=kept.snapshot.pid)
                await self._commit_running(key, workload)
        running = self.processes.get(key)
        moved = running is not None and running.plan.host != self.launch.host
        if managed is not None and (managed.spec_hash != digest or managed.uid != uid or moved):
            if managed.uid == uid and not moved and key not in self.evicted:
                deferred = self._new_model_not_ready(key, raw, workload, digest)
                if deferred is not None:
                    # Make before break: the running process keeps serving the previous spec
                    # until the new model is on disk (a download can take hours).
                    problem, retry = await self._register(key, raw)
                    await self._write_status(key, raw, True, degraded=problem or deferred.failed,
                                             rollout=deferred.pending)
                    return 30.0 if deferred.failed else retry
            log.info("spec changed; respawning llama-server", service=key, old=managed.spec_hash[:12], new=digest[:12])
            self.events.emit(raw["metadata"], "Respawning",
                                     f"spec changed (hash {managed.spec_hash[:12]} -> {digest[:12]}); restarting llama-server")
            self.metrics.respawns.labels(**service_labels(key)).inc()
            await self._stop(key)
            managed = None

        failed = self.processes.get(key)
        if failed is not None and failed.failed is not None:
            log.warning("restarting supervision after an internal error", service=key)
            await self._stop(key)
            managed = None

        if managed is not None and key in self.evicted:
            log.warning("evicted: stopping llama-server to relieve memory pressure", service=key)
            await self._stop(key)
            managed = None

        if managed is None:
            found = self.model_files.lookup(workload.model, key, secret_ref=workload.model.spec.source_secret_ref)
            if isinstance(found, Blocker):
                await self._withdraw(key)
                await self._write_status(key, raw, True, blocker=found)
                return 30.0
            if isinstance(found, ModelPending):
                await self._withdraw(key)
                await self._write_status(key, raw, True, blocker=Blocker("ModelDownloading", found.message, phase="Creating"))
                return None  # the store re-queues the key on progress and when done
            draft = self._draft_lookup(workload)
            if isinstance(draft, Blocker):
                await self._withdraw(key)
                await self._write_status(key, raw, True, blocker=draft)
                return 2.0 if draft.reason == "ModelDownloading" else 30.0  # the draft's download calls no one back
            if missing := self._engine_missing(workload):
                await self._withdraw(key)
                await self._write_status(key, raw, True, blocker=missing)
                return None
            admission = await self.memory.check(key, workload, found.path, draft.path if draft else None)
            if isinstance(admission, Waiting):
                self._report_waiting(key, raw, admission)
                await self._withdraw(key)
                await self._write_status(key, raw, True, blocker=admission.blocker, scheduling=admission.scheduling)
                return None  # re-queued when memory is freed or pressure clears
            self._waiting_reported.pop(key, None)
            await self._start(key, workload, digest, uid, found, draft)
        elif not self.memory.counts(key):
            # Taken over while its downloaded file was being re-verified (the store re-queues
            # the key when that ends): what it holds counts against others from now on.
            await self._commit_running(key, workload)

        problem, retry = await self._register(key, raw)
        await self._write_status(key, raw, True, degraded=problem)
        return retry

    async def _not_ours(self, key: str, raw: dict, verdict: NotOurs, ref: tuple[str, str] | None,
                        model_raw: dict | None) -> None:
        """Not (or no longer) a service this Mac serves: stop what runs, unless only its Model
        vanished (a deleted Model is not an outage), and speak for an unplaced fleet service."""
        managed = self.managed.get(key)
        if (unplaced := self.allowlist.unplaced(key)) and managed is None and self.processes.get(key) is None:
            # Fleet: no Mac can take it, and this one speaks for it (metal_agent/fleet.py).
            await self._write_status(key, raw, True, blocker=unplaced, scheduling=(unplaced.reason, unplaced.message))
            return
        model_missing = model_raw is None and ref is not None
        if model_missing and managed is None and self.processes.get(key) is None:
            # After an agent restart: the same rule as at run time, a vanished Model costs no reload.
            if self.processes.adopt_as_recorded(key, raw["metadata"].get("uid") or ""):
                log.info("kept the running llama-server although its Model is missing", service=key)
        if managed is None and self.processes.get(key) is None:
            return
        if model_missing:
            await self._write_status(key, raw, managed.workload.isvc.spec.wants_process if managed else True,
                                     degraded=Blocker("ModelNotFound",
                                                      f"Model {ref[1]} was not found; still serving the last valid spec"))
            return
        log.info("InferenceService is no longer ours; stopping llama-server", service=key, why=verdict.reason)
        await self._stop(key)
        await self._unregister(key)

    def _slots_open(self, kept) -> bool:
        """Does a process the agent found running (from an older agent) lack --no-slots?"""
        if not self.launch.no_slots or kept.plan.engine.name is not EngineName.LLAMA_SERVER:
            return False
        try:
            return "--no-slots" not in kept.plan.build_argv(kept.plan.port or 1)
        except Exception:  # noqa: BLE001 - an argv we cannot rebuild: leave the process to the usual rules
            return False

    def _source_refusals(self, workload: Workload, model_raw: dict | None) -> tuple[FieldError, ...]:
        """A local source outside the owner's model roots, or one LLMKube's controller refused."""
        return workload_refusals(workload, model_raw, self.launch.policy.model_roots)

    async def _invalid(self, key: str, raw: dict, verdict: Invalid) -> None:
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
            await self._withdraw(key)
            await self._write_status(key, raw, True, spec_errors=errors, spec_reason=reason)
            return
        if managed is None and self.processes.get(key) is None:
            # After an agent restart: keep the previous agent's process serving its last valid spec.
            if self.processes.adopt_as_recorded(key, raw["metadata"].get("uid") or ""):
                log.info("kept the running llama-server of the last valid spec", service=key)
        wants = managed.workload.isvc.spec.wants_process if managed else True
        await self._write_status(key, raw, wants, spec_errors=errors, spec_reason=reason)

    def _new_model_not_ready(self, key: str, raw: dict, workload: Workload, digest: str) -> _Deferred | None:
        """Whether a changed spec's model is not on disk yet (downloading, or failed to),
        so the running process should go on serving the previous spec meanwhile."""
        found = self.model_files.lookup(workload.model, key, secret_ref=workload.model.spec.source_secret_ref)
        if isinstance(found, ModelReady):
            self._deferred_reported.pop(key, None)
            return None
        if isinstance(found, ModelPending):
            deferred = _Deferred(pending=Blocker("ModelDownloading", found.message, phase="Creating"))
        else:
            deferred = _Deferred(failed=Blocker(found.reason, f"still serving the previous spec; {found.message}"))
        if self._deferred_reported.get(key) != (digest, found.reason if deferred.failed else ""):
            self._deferred_reported[key] = (digest, found.reason if deferred.failed else "")
            why = found.message
            log.info("spec changed; the running llama-server serves until the new model is ready", service=key,
                     new=digest[:12], why=why)
            self.events.emit(raw["metadata"], "RespawnDeferred",
                             f"spec changed (hash {digest[:12]}); llama-server keeps serving the previous spec "
                             f"until the new model is ready: {why}", warning=deferred.failed is not None)
        return deferred

    async def _commit_running(self, key: str, workload: Workload) -> None:
        """A running process's memory counts against what others may start."""
        found = self.model_files.lookup(workload.model, key, secret_ref=workload.model.spec.source_secret_ref)
        draft = self._draft_lookup(workload)
        if isinstance(found, ModelReady) and not isinstance(draft, Blocker):
            await self.memory.commit_running(key, workload, found.path, draft.path if draft else None)

    def on_address_change(self, old: str, new: str, why: str, bind: str) -> None:
        """This Mac's address moved: register the new one; a llama-server bound to the old
        address is respawned on the new one (`_reconcile` sees its host differ)."""
        log.warning("host address changed; re-registering", old=old, new=new, why=why)
        self.launch = replace(self.launch, host=bind, register_address=new if self.launch.register_address else None)
        for key in list(self.managed):
            raw = self.isvcs.get(key)
            if raw is not None:
                self.events.emit(raw["metadata"], "HostAddressChanged",
                                 f"this Mac's address changed from {old} to {new} ({why}); re-registering", warning=True)
            self.queue.add(key)

    def resync_all(self) -> None:
        """Both caches are full now: decide about every service and every process we run."""
        for key in {object_key(raw) for raw in self.isvcs.items()} | set(self.processes.supervisors):
            self.queue.add(key)

    def waiting_reason(self, key: str) -> str | None:
        """Why memory admission holds `key` back, while it does (the fleet hands such a replica on)."""
        return self._waiting_reported.get(key) if key in self.memory.waiting else None

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
        if self.launch.command(engine):
            return None
        return Blocker("RuntimeMissing", f"format {workload.model.spec.format.value} is served by {engine.display},"
                       " which this agent did not find: pip install mlx-lm into the agent's venv (or pass"
                       " --mlx-server PATH) and restart the agent; other services are unaffected")

    async def _start(self, key: str, workload: Workload, digest: str, uid: str, found: ModelReady,
                     draft: ModelReady | None = None) -> None:
        launch = self.launch
        engine = self._engine(workload)

        def argv_for(port: int) -> tuple[str, ...]:
            return engine.argv(workload, Launch(
                command=launch.command(engine), model_path=str(found.path), host=launch.host, port=port,
                threads=launch.threads, mlock=launch.mlock, mlock_style=launch.mlock_style,
                verbosity_flag=launch.verbosity_flag, no_jinja=launch.no_jinja, no_slots=launch.no_slots,
                draft_model_path=str(draft.path) if draft else None,
            ))

        plan = LaunchPlan(key=key, uid=uid, spec_hash=digest, host=launch.host, build_argv=argv_for, engine=engine)
        self.managed[key] = _Managed(workload, digest, uid)
        await self.processes.start(plan)
        self.metrics.managed_processes.set(len(self.processes.supervisors))

    async def _stop(self, key: str) -> None:
        if self.registrar is not None and self.processes.get(key) is not None:
            namespace, name = key.split("/", 1)
            try:
                await self.registrar.mark_not_ready(namespace, name)
            except Exception as err:  # noqa: BLE001 - the API is away: stop anyway; the slice is fixed later
                log.warning("could not mark the slice not ready before stopping", service=key,
                            error=f"{type(err).__name__}: {err}")
        self.managed.pop(key, None)
        await self.processes.stop(key)
        self.metrics.process_healthy.labels(**service_labels(key)).set(0)
        for waiting in self.memory.release(key):  # memory freed: those waiting may fit now
            self.queue.add(waiting)
        self.metrics.managed_processes.set(len(self.processes.supervisors))

    async def _register(self, key: str, raw: dict) -> tuple[Blocker | None, float | None]:
        """Publish the service's endpoint; never lets a failure touch the process.

        Returns a problem for status (if the name cannot be registered) and a
        retry delay when the API refused or failed the write.
        """
        supervisor = self.processes.get(key)
        if self.registrar is None or supervisor is None or supervisor.snapshot.port is None:
            return None, None
        name = raw["metadata"]["name"]
        if problem := service_name_problem(name):
            return Blocker("RegistrationFailed", problem), None
        snap = supervisor.snapshot
        reg = Registration(namespace=key.split("/", 1)[0], isvc_name=name, isvc_uid=raw["metadata"].get("uid") or "",
                           address=self.launch.register_address, port=snap.port, ready=snap.ready,
                           model=str((raw.get("spec") or {}).get("modelRef") or ""),
                           runtime=supervisor.plan.engine.runtime_label)
        try:
            await self.registrar.ensure(reg)
        except NameTaken as taken:
            # The name belongs to someone else's object: it stays untouched, the model keeps
            # serving on the Mac, and we look again (it may be removed or handed over).
            failures = self._registration_failures[key] = self._registration_failures.get(key, 0) + 1
            message = conflict_message(taken.kind, taken.namespace, taken.name)
            if self._conflict_reported.get(key) != message:
                self._conflict_reported[key] = message
                log.warning("not registering: the name is taken by an object we do not own", service=key,
                            object=f"{taken.kind} {taken.namespace}/{taken.name}")
                self.events.emit(raw["metadata"], SERVICE_NAME_CONFLICT, message, warning=True)
            else:
                log.debug("still not registering: the name is taken", service=key, attempt=failures)
            return Blocker(SERVICE_NAME_CONFLICT, message), REGISTRATION_BACKOFF.delay(failures)
        except Exception as err:  # noqa: BLE001 - API errors and outages alike: retry, keep serving
            failures = self._registration_failures[key] = self._registration_failures.get(key, 0) + 1
            delay = REGISTRATION_BACKOFF.delay(failures)
            log.warning("registration failed; retrying", service=key, error=f"{type(err).__name__}: {err}", retry_in_s=round(delay, 2))
            return None, delay
        self._registration_failures.pop(key, None)
        self._conflict_reported.pop(key, None)
        return None, None

    async def _unregister(self, key: str) -> None:
        if self.registrar is not None:
            namespace, name = key.split("/", 1)
            await self.registrar.remove(namespace, name)

    async def _withdraw(self, key: str) -> None:
        """Nothing serves this key now: no slice may say otherwise (the Service stays)."""
        if self.registrar is not None:
            namespace, name = key.split("/", 1)
            await self.registrar.withdraw(namespace, name)

    def endpoint_for(self, key: str, raw: dict, mode: str) -> str | None:
        if self.registrar is None or not self.registrar.registered(key):
            return None
        namespace, name = key.split("/", 1)
        return endpoint_url(namespace, name, endpoint_path(raw.get("spec"), mode))

    def _forget(self, key: str) -> None:
        self.model_files.forget(key)
        self.memory.forget(key)
        self.evicted.discard(key)
        self._waiting_reported.pop(key, None)
        self._deferred_reported.pop(key, None)
        self._invalid_reported.pop(key, None)
        self.reporter.forget(key)
        self._registration_failures.pop(key, None)
        self._conflict_reported.pop(key, None)
        namespace, name = key.split("/", 1)
        self.metrics.forget_service(namespace, name)

    async def _write_status(self, key: str, raw: dict, wants_process: bool, **facts) -> None:
        """Tell the StatusReporter what is true of `key` (see its `write` for `facts`)."""
        supervisor = self.processes.get(key)
        managed = self.managed.get(key)
        registered = self.registrar is not None and self.registrar.registered(key)
        await self.reporter.write(
            key, raw, wants_process,
            process=self._snapshot(supervisor),
            endpoint=self.endpoint_for(key, raw, managed.workload.isvc.spec.mode.value if managed else "chat")
            if supervisor else None,
            serving=supervisor is not None and supervisor.snapshot.ready and registered,
            memory_pressure=self._pressure_condition(key),
            gpu_layers=managed.workload.model.spec.hardware.gpu.layers if managed else 0,
            **facts,
        )

    @staticmethod
    def _snapshot(supervisor) -> Snapshot | None:
        """A supervisor that has not spawned yet is starting, not stopped (stopped ones are
        dropped): said once, it spares a status write a few milliseconds later."""
        if supervisor is None:
            return None
        snap = supervisor.snapshot
        return replace(snap, state=State.STARTING) if snap.state is State.STOPPED else snap

    # -- memory pressure (called by the watchdog) ---------------------------

    def _pressure_condition(self, key: str) -> Condition:
        if key in self.evicted:
            return Condition("MemoryPressure", True, "Evicted",
                             "stopped to relieve memory pressure; restarts when pressure is Normal")
        level = self.pressure
        message = f"memory pressure on this Mac is {level.label}"
        if self._skip_message and level is not Level.NORMAL:
            message += f"; nothing evicted: {self._skip_message}"
        return Condition("MemoryPressure", level is not Level.NORMAL, level.label, message)

    def _ours(self) -> set[str]:
        return set(self.managed) | self.memory.waiting | self.evicted

    def on_pressure_change(self, old: Level, new: Level) -> None:
        self.pressure = new
        self._last_skip = None
        self._skip_message = ""
        for key in self._ours():
            raw = self.isvcs.get(key)
            if raw is not None:
                self.events.emit(raw["metadata"], "MemoryPressureLevelChanged",
                                 f"memory pressure {old.label} -> {new.label}", warning=new is not Level.NORMAL)
            self.queue.add(key)

    async def evict(self, key: str) -> None:
        raw = self.isvcs.get(key)
        if raw is not None:
            self.events.emit(raw["metadata"], "Evicted", "stopped llama-server to relieve critical memory pressure",
                             warning=True)
        self._explain_skip("")
        self.evicted.add(key)
        self.queue.add(key)  # the stop happens in the key's own reconcile, never beside it

    def unblock(self, keys: frozenset[str]) -> None:
        for key in keys:
            self.evicted.discard(key)
            self.queue.add(key)

    def eviction_skipped(self, reason: str, message: str = "") -> None:
        if reason == self._last_skip:
            return  # once per reason while the pressure lasts, not every tick
        self._last_skip = reason
        self._explain_skip(message)
        for key in self.managed:
            raw = self.isvcs.get(key)
            if raw is not None:
                self.events.emit(raw["metadata"], "EvictionSkipped",
                                 f"memory is critical but nothing was evicted: {message or reason}", warning=True)

    def _explain_skip(self, message: str) -> None:
        """Say (or stop saying) in every MemoryPressure condition why nothing was evicted."""
        if message != self._skip_message:
            self._skip_message = message
            for key in self.managed:
                self.queue.add(key)

    def memory_view(self) -> list[ServiceMemory]:
        """The running services as the watchdog needs them."""
        rows = []
        for key, managed in self.managed.items():
            supervisor = self.processes.get(key)
            snap = supervisor.snapshot if supervisor else None
            spec = managed.workload.isvc.spec
            rows.append(ServiceMemory(key=key, priority=spec.priority,
                                      rss_bytes=process_rss(snap.pid) if snap and snap.pid else 0,
                                      started_at=(snap.started_at or 0.0) if snap else 0.0,
                                      eviction_protection=spec.eviction_protection))
        return rows

    # -- lifecycle --------------------------------------------------------

    def wanted(self, key: str) -> bool:
        """Should a process serve `key`? The one rule for start-up cleanup and run time.

        Like `_reconcile`: an invalid spec keeps the running process (its last valid spec),
        and so does a Model that vanished while a recorded process serves it.
        """
        raw = self.isvcs.get(key)
        if raw is None:
            return False
        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        verdict = evaluate(raw, model_raw, self.allowlist, self.launch.default_engine, policy=self.launch.policy)
        if isinstance(verdict, NotOurs):
            return model_raw is None and ref is not None and self.processes.has_record(key)
        if isinstance(verdict, Parsed) and self._source_refusals(verdict.value, model_raw):
            return key in self.managed  # refused: only a process this agent started keeps serving
        if isinstance(verdict, Invalid):
            return key in self.managed or not any(e.security for e in verdict.errors)
        return verdict.value.isvc.spec.wants_process

    def ours(self, key: str) -> bool:
        """Is `key` a service of this agent at all (running or scaled to zero)? Its Service stays."""
        raw = self.isvcs.get(key)
        if raw is None:
            return False
        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        verdict = evaluate(raw, model_raw, self.allowlist, self.launch.default_engine, policy=self.launch.policy)
        return not isinstance(verdict, NotOurs) or self.wanted(key)

    async def sweep_unwanted(self, namespaces: tuple[str, ...] | None = None) -> None:
        """After the first full sync: stop a previous agent's processes nobody wants any more,
        and delete Services/EndpointSlices (and legacy Endpoints) left for services we no longer serve."""
        await self.processes.stop_unwanted_adoptable(self.wanted)
        if self.registrar is not None:
            removed = await self.registrar.cleanup(
                namespaces, lambda ns, name: self.ours(f"{ns}/{name}") or not self.allowlist.admits(ns, name),
                lambda ns, name: self.wanted(f"{ns}/{name}") or not self.allowlist.admits(ns, name))
            if removed:
                log.info("removed leftover registrations", count=removed)

    async def shutdown(self, *, stop_processes: bool) -> None:
        await self.queue.stop()
        await self.model_files.aclose()
        await self.processes.shutdown(stop_processes=stop_processes)
        try:
            await within(self.events.flush(), 5)
        except asyncio.TimeoutError:
            pass
        await self.events.close()
