"""rolloutPolicy and maxPodLifetimeSeconds (issue 22): the rules (core/lifecycle.py), their reading
from a spec, and the controller applying them with the Reconciler's fakes (controller/rollout.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from metal_agent.controller.publishing import HostAddress, Publisher
from metal_agent.controller.reconciler import Reconciler
from metal_agent.controller.results import Requeue
from metal_agent.controller.rollout import IDLE_RECHECK_S, Rollouts
from metal_agent.core.isvc_validation import parse_inference_service
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.lifecycle import Lifetime, RolloutPolicy, Verdict, recycle, rollout
from metal_agent.core.result import Invalid
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.memory.state import MemoryState
from metal_agent.metrics import AgentMetrics
from tests.support.controller_fakes import (FakeEvents, FakeGuard, FakeInformer, FakeModelFiles, FakeProcesses,
                                            FakeReporter, isvc, model)

WAIT = RolloutPolicy(wait_for_idle=True, idle_timeout_s=60)


def test_a_rollout_waits_for_idle_until_its_timeout_unless_forced():
    assert rollout(None, busy=True, waited_s=0) is Verdict.GO
    assert rollout(RolloutPolicy(), busy=True, waited_s=0) is Verdict.GO  # waitForIdle unset
    assert rollout(WAIT, busy=False, waited_s=0) is Verdict.GO
    assert rollout(WAIT, busy=True, waited_s=59) is Verdict.WAIT
    assert rollout(WAIT, busy=None, waited_s=59) is Verdict.WAIT  # unknown counts as busy
    assert rollout(WAIT, busy=True, waited_s=60) is Verdict.TIMED_OUT
    assert rollout(RolloutPolicy(wait_for_idle=True, force=True), busy=True, waited_s=0) is Verdict.GO
    assert RolloutPolicy(wait_for_idle=True).timeout_s == 300  # LLMKube's default for 0/unset


def test_a_process_is_recycled_past_its_lifetime_when_idle_if_asked():
    life = Lifetime(max_s=100)
    assert recycle(Lifetime(), None, age_s=10**9, busy=True) is Verdict.NOT_YET
    assert recycle(life, None, age_s=99, busy=False) is Verdict.NOT_YET
    assert recycle(life, None, age_s=100, busy=True) is Verdict.GO  # no waitForIdle: at once
    assert recycle(life, WAIT, age_s=150, busy=True) is Verdict.WAIT  # no idle timeout: as long as it takes
    assert recycle(life, WAIT, age_s=150, busy=False) is Verdict.GO
    bounded = Lifetime(max_s=100, idle_timeout_s=30)
    assert recycle(bounded, WAIT, age_s=129, busy=True) is Verdict.WAIT
    assert recycle(bounded, WAIT, age_s=130, busy=True) is Verdict.TIMED_OUT
    assert recycle(Lifetime(max_s=100, idle_timeout_s=0), WAIT, age_s=100, busy=True) is Verdict.TIMED_OUT


def _doc(**spec) -> dict:
    return {"apiVersion": "inference.llmkube.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "ml"}, "spec": {"modelRef": "qwen", **spec}}


def test_the_fields_are_read_from_the_spec_and_bad_values_refused_by_path():
    parsed = parse_inference_service(_doc(rolloutPolicy={"waitForIdle": True, "idleTimeoutSeconds": 30},
                                          maxPodLifetimeSeconds=3600, maxPodLifetimeIdleTimeoutSeconds=0))
    spec = parsed.value.spec
    assert spec.rollout_policy == RolloutPolicy(wait_for_idle=True, idle_timeout_s=30)
    assert spec.lifetime == Lifetime(max_s=3600, idle_timeout_s=0)
    bad = parse_inference_service(_doc(maxPodLifetimeSeconds=0, rolloutPolicy={"idleTimeoutSeconds": -1}))
    assert isinstance(bad, Invalid)
    assert {e.path for e in bad.errors} == {"spec.maxPodLifetimeSeconds", "spec.rolloutPolicy.idleTimeoutSeconds"}


def test_the_fields_do_not_change_the_spec_hash():
    from metal_agent.core.spec_hash import _payload

    plain = parse_inference_service(_doc()).value.spec
    timed = parse_inference_service(_doc(rolloutPolicy={"waitForIdle": True}, maxPodLifetimeSeconds=60)).value.spec
    from metal_agent.core.model_validation import parse_model

    m = parse_model(model()).value.spec
    assert _payload(m, plain) == _payload(m, timed)


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class Parts:
    def __init__(self, raw: dict, *, front_door: bool = True) -> None:
        self.isvcs = FakeInformer(raw)
        self.processes = FakeProcesses()
        self.events = FakeEvents()
        self.reporter = FakeReporter()
        self.routes: dict[str, dict] = {"ml/chat": {"inflight": 0, "queued": 0}}
        self.later: list[tuple[str, float]] = []
        self.clock = Clock()
        files = FakeModelFiles(None)
        self.rollouts = Rollouts(model_files=files, events=self.events,
                                 enqueue_after=lambda key, delay: self.later.append((key, delay)),
                                 activity=self._activity if front_door else None, clock=self.clock)
        self.reconciler = Reconciler(
            isvcs=self.isvcs, models=FakeInformer(model()), processes=self.processes, model_files=files,
            memory=FakeGuard(), reporter=self.reporter, publisher=Publisher(None, HostAddress(bind="127.0.0.1"),
                                                                             self.events),
            events=self.events, metrics=AgentMetrics(CollectorRegistry()), pressure=MemoryState(),
            wake=lambda keys: None, rollouts=self.rollouts,
            launch=LaunchSettings(llama_server="/bin/llama-server", policy=SpecPolicy(model_roots=("/models",))))

    async def _activity(self) -> dict:
        return {"routes": self.routes}

    def busy(self, inflight: int) -> None:
        self.routes["ml/chat"]["inflight"] = inflight


async def test_a_changed_spec_waits_while_busy_and_respawns_when_idle():
    raw = isvc(rolloutPolicy={"waitForIdle": True, "idleTimeoutSeconds": 60})
    parts = Parts(raw)
    await parts.reconciler.reconcile("ml/chat")
    parts.busy(1)
    raw["spec"]["contextSize"] = 512
    result = await parts.reconciler.reconcile("ml/chat")
    assert result == Requeue(IDLE_RECHECK_S, "waiting for idle before respawning")
    assert len(parts.processes.started) == 1 and parts.processes.stopped == []
    assert parts.reporter.written["ml/chat"]["rollout"].reason == "RolloutDeferred"
    await parts.reconciler.reconcile("ml/chat")
    assert parts.events.reasons().count("RolloutDeferred") == 1  # said once per new spec
    parts.busy(0)
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == ["ml/chat"] and len(parts.processes.started) == 2


async def test_a_busy_rollout_goes_ahead_after_its_idle_timeout():
    raw = isvc(rolloutPolicy={"waitForIdle": True, "idleTimeoutSeconds": 60})
    parts = Parts(raw)
    await parts.reconciler.reconcile("ml/chat")
    parts.busy(3)
    raw["spec"]["contextSize"] = 512
    await parts.reconciler.reconcile("ml/chat")
    parts.clock.now += 61
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == ["ml/chat"] and "IdleTimeoutExceeded" in parts.events.reasons()


async def test_without_the_front_door_idleness_is_unknown_and_only_the_timeout_ends_the_wait():
    raw = isvc(rolloutPolicy={"waitForIdle": True, "idleTimeoutSeconds": 10})
    parts = Parts(raw, front_door=False)
    await parts.reconciler.reconcile("ml/chat")
    raw["spec"]["contextSize"] = 512
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == []
    assert "without the front door" in parts.reporter.written["ml/chat"]["rollout"].message
    parts.clock.now += 10
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == ["ml/chat"]


async def test_force_respawns_at_once():
    raw = isvc(rolloutPolicy={"waitForIdle": True, "force": True})
    parts = Parts(raw)
    await parts.reconciler.reconcile("ml/chat")
    parts.busy(1)
    raw["spec"]["contextSize"] = 512
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == ["ml/chat"]


async def test_an_old_process_is_recycled_when_idle_and_looked_at_again_when_it_expires():
    raw = isvc(maxPodLifetimeSeconds=100, rolloutPolicy={"waitForIdle": True})
    parts = Parts(raw)
    await parts.reconciler.reconcile("ml/chat")
    started = parts.clock.now
    sup = parts.processes.supervisors["ml/chat"]
    from dataclasses import replace

    sup.snapshot = replace(sup.snapshot, started_at=started)
    parts.clock.now = started + 40
    await parts.reconciler.reconcile("ml/chat")
    assert parts.later[-1] == ("ml/chat", 60.0) and parts.processes.stopped == []  # look again at expiry
    parts.clock.now = started + 100
    parts.busy(1)
    await parts.reconciler.reconcile("ml/chat")
    assert parts.later[-1] == ("ml/chat", IDLE_RECHECK_S) and parts.processes.stopped == []
    parts.busy(0)
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == ["ml/chat"] and len(parts.processes.started) == 2
    assert "Recycling" in parts.events.reasons()
