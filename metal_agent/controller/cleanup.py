"""Start-up cleanup (what a previous agent left that nobody wants) and shutting the controller down.

After the first full sync, and only then (an empty cache is not "everything
was deleted"): a previous agent's llama-servers whose service is gone or
changed hands are stopped, and Services/EndpointSlices (and legacy
Endpoints) left for services this agent no longer serves are deleted. The
rule of what is wanted is the reconcile's own, so the sweep never stops what
the reconcile would keep.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

import structlog

from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import Informer
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.adapters.model_roots import workload_refusals
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.controller.publishing import Publisher
from metal_agent.controller.workqueue import WorkQueue
from metal_agent.controller.gate import EVERY_SERVICE, Gate
from metal_agent.core.claim import evaluate, wanted_model
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.result import Invalid, NotOurs, Parsed
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.tasks import within

log = structlog.get_logger(__name__)


class Sweep:
    def __init__(self, *, isvcs: Informer, models: Informer, processes: ProcessManager, publisher: Publisher,
                 managed: Mapping[str, object], default_engine: str, policy: SpecPolicy,
                 gate: Gate = EVERY_SERVICE, launch: LaunchSettings | None = None) -> None:
        """`managed`: the reconciler's table of the services it started (a refused spec's
        process keeps serving only if this agent started it). `launch`: the reconciler's launch
        settings, so a spec the installed server is too old for is judged as the reconcile judges it."""
        self.isvcs = isvcs
        self.models = models
        self.processes = processes
        self.publisher = publisher
        self.managed = managed
        self.default_engine = default_engine
        self.policy = policy
        self.gate = gate
        self.launch = launch

    def _verdict(self, key: str):
        raw = self.isvcs.get(key)
        if raw is None:
            return None, None, None
        ref = wanted_model(raw)
        model_raw = self.models.get(f"{ref[0]}/{ref[1]}") if ref else None
        return evaluate(raw, model_raw, self.gate, self.default_engine, policy=self.policy,
                        settings=self.launch), ref, model_raw

    def wanted(self, key: str) -> bool:
        """Should a process serve `key`? The one rule for start-up cleanup and run time.

        Like the reconcile: an invalid spec keeps the running process (its last valid spec),
        and so does a Model that vanished while a recorded process serves it.
        """
        verdict, ref, model_raw = self._verdict(key)
        if verdict is None:
            return False
        if isinstance(verdict, NotOurs):
            return model_raw is None and ref is not None and self.processes.has_record(key)
        if isinstance(verdict, Parsed) and workload_refusals(verdict.value, model_raw, self.policy.model_roots):
            return key in self.managed  # refused: only a process this agent started keeps serving
        if isinstance(verdict, Invalid):
            return key in self.managed or not any(e.security for e in verdict.errors)
        return verdict.value.isvc.spec.wants_process

    def ours(self, key: str) -> bool:
        """Is `key` a service of this agent at all (running or scaled to zero)? Its Service stays."""
        verdict, _, _ = self._verdict(key)
        if verdict is None:
            return False
        return not isinstance(verdict, NotOurs) or self.wanted(key)

    async def sweep_unwanted(self, namespaces: tuple[str, ...] | None = None) -> None:
        """Stop a previous agent's processes nobody wants any more, and delete
        Services/EndpointSlices (and legacy Endpoints) left for services we no longer serve."""
        await self.processes.stop_unwanted_adoptable(self.wanted)
        removed = await self.publisher.cleanup(
            namespaces, lambda ns, name: self.ours(f"{ns}/{name}") or not self.gate.admits(ns, name),
            lambda ns, name: self.wanted(f"{ns}/{name}") or not self.gate.admits(ns, name))
        if removed:
            log.info("removed leftover registrations", count=removed)


async def shutdown(*, queue: WorkQueue, model_files: ModelFiles, processes: ProcessManager, events: EventRecorder,
                   stop_processes: bool) -> None:
    """Stop reconciling, then the downloads, then (by default) leave the engines running for
    the next agent to adopt; the Events still buffered get five seconds to go out."""
    await queue.stop()
    await model_files.aclose()
    await processes.shutdown(stop_processes=stop_processes)
    try:
        await within(events.flush(), 5)
    except asyncio.TimeoutError:
        pass
    await events.close()
