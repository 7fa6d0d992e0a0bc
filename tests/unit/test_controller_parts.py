"""The controller's smaller parts, each on its own with fakes only for the ports it is handed:
the publisher, the intake, the runner, the pressure responder and the status reporter."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from metal_agent.adapters.kube.registrar import NameTaken
from metal_agent.controller.intake import Intake
from metal_agent.controller.publishing import AddressMove, HostAddress, Publisher
from metal_agent.controller.results import DONE, Requeue
from metal_agent.controller.runner import Runner
from metal_agent.controller.status_reporter import StatusReporter
from metal_agent.controller.workqueue import WorkQueue
from metal_agent.controller.gate import EVERY_SERVICE
from metal_agent.core.conditions import Condition
from metal_agent.core.process import Snapshot, State, SupervisorEvent
from metal_agent.core.pressure import Level
from metal_agent.core.status_owner import StatusMode
from metal_agent.memory.responder import PressureResponder
from metal_agent.memory.state import MemoryState
from metal_agent.metrics import AgentMetrics
from tests.support.controller_fakes import FakeEvents, FakeModelFiles, FakeProcesses, FakeSupervisor, isvc, model

KEY = "ml/chat"


class FakeRegistrar:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.ensured: list = []
        self.withdrawn: list[tuple[str, str]] = []

    def registered(self, key: str) -> bool:
        return bool(self.ensured)

    async def ensure(self, reg) -> bool:
        if self.fail is not None:
            raise self.fail
        self.ensured.append(reg)
        return True

    async def withdraw(self, namespace: str, name: str) -> None:
        self.withdrawn.append((namespace, name))


def supervisor(port: int | None = 8081, ready: bool = True) -> FakeSupervisor:
    from metal_agent.adapters.process.supervisor import LaunchPlan

    plan = LaunchPlan(key=KEY, uid="u1", spec_hash="h", host="10.0.0.5", build_argv=lambda p: ())
    return FakeSupervisor(plan, Snapshot(key=KEY, spec_hash="h", state=State.READY if ready else State.STARTING,
                                         pid=1, port=port))


# -- publisher ---------------------------------------------------------------

async def test_the_publisher_registers_the_shared_address_and_follows_a_move():
    registrar, address = FakeRegistrar(), HostAddress(bind="10.0.0.5", registered="10.0.0.5")
    publisher = Publisher(registrar, address, FakeEvents())
    assert await publisher.register(KEY, isvc(), supervisor()) == (None, None)
    address.move("10.0.0.9", "10.0.0.9")
    await publisher.register(KEY, isvc(), supervisor())
    assert [r.address for r in registrar.ensured] == ["10.0.0.5", "10.0.0.9"]
    assert publisher.endpoint_for(KEY, isvc(), "chat").startswith("http://chat.ml.svc")


async def test_a_taken_name_is_reported_once_and_retried_with_growing_delays():
    events = FakeEvents()
    publisher = Publisher(FakeRegistrar(fail=NameTaken("Service", "ml", "chat")),
                          HostAddress(bind="10.0.0.5", registered="10.0.0.5"), events)
    first = await publisher.register(KEY, isvc(), supervisor())
    second = await publisher.register(KEY, isvc(), supervisor())
    assert first[0].reason == second[0].reason == "ServiceNameConflict"
    assert events.reasons() == ["ServiceNameConflict"]
    assert 0 < first[1] and 0 < second[1]


async def test_without_a_published_address_publishing_does_nothing():
    registrar = FakeRegistrar()
    publisher = Publisher(registrar, HostAddress(bind="127.0.0.1"), FakeEvents())
    assert await publisher.register(KEY, isvc(), supervisor()) == (None, None)
    await publisher.withdraw(KEY)
    assert registrar.ensured == [] and registrar.withdrawn == [] and not publisher.registered(KEY)


def test_an_address_move_queues_every_running_service_and_tells_the_followers():
    @dataclass
    class Side:
        address: str

    @dataclass
    class Change:
        old: Side
        new: Side

    Side.reason = "tailscale"
    queued, followed, events = [], [], FakeEvents()
    address = HostAddress(bind="10.0.0.5", registered="10.0.0.5")
    move = AddressMove(address=address, bind_for=lambda a: a, running={KEY: object()}, isvcs={KEY: isvc()},
                       events=events, enqueue=queued.append, also=followed.append)
    move(Change(Side("10.0.0.5"), Side("10.0.0.9")))
    assert (address.bind, address.registered) == ("10.0.0.9", "10.0.0.9")
    assert queued == [KEY] and followed == ["10.0.0.9"] and events.reasons() == ["HostAddressChanged"]


# -- intake and runner ---------------------------------------------------------

def queued(queue: WorkQueue) -> set[str]:
    return set(queue._queued)


async def test_the_intake_turns_events_into_keys():
    queue = WorkQueue()
    cache = {KEY: isvc(), "ml/other": isvc("other", model="llama")}
    intake = Intake(queue, isvcs=cache, model_files=FakeModelFiles(), events=FakeEvents(),
                    metrics=AgentMetrics(CollectorRegistry()))
    intake.on_model_change(model(), model())
    assert queued(queue) == {KEY}  # only the service that refers to the Model
    intake.on_process_change("ml/gone", Snapshot(key="ml/gone", spec_hash="h", state=State.READY), None)
    intake.resync_all(["ml/orphan"])
    assert queued(queue) == {KEY, "ml/other", "ml/gone", "ml/orphan"}


async def test_a_process_event_becomes_an_event_on_its_service():
    events = FakeEvents()
    intake = Intake(WorkQueue(), isvcs={KEY: isvc()}, model_files=FakeModelFiles(), events=events,
                    metrics=AgentMetrics(CollectorRegistry()))
    intake.on_process_change(KEY, Snapshot(key=KEY, spec_hash="h", state=State.READY),
                             SupervisorEvent("Ready", "llama-server is ready"))
    assert events.emitted == [("chat", "Ready", "llama-server is ready")]


@pytest.mark.parametrize("result, delay, outcome", [(DONE, None, "ok"), (Requeue(2.0, "why"), 2.0, "requeue")])
async def test_the_runner_turns_results_into_queue_delays_and_counts_them(result, delay, outcome):
    class Reconciler:
        async def reconcile(self, key):
            return result

    registry = CollectorRegistry()
    runner = Runner(WorkQueue(), Reconciler(), AgentMetrics(registry))
    assert await runner.handle(KEY) == delay
    assert registry.get_sample_value("llmkube_metal_agent_reconciles_total", {"outcome": outcome}) == 1


# -- pressure responder --------------------------------------------------------

def test_the_responder_marks_evictions_and_queues_the_keys_it_concerns():
    state, queued_keys, events = MemoryState(), [], FakeEvents()
    state.waiting.add("ml/waits")
    responder = PressureResponder(state=state, running={KEY: object()}, isvcs={KEY: isvc()},
                                  processes=FakeProcesses(), events=events, enqueue=queued_keys.append)
    responder.on_pressure_change(Level.NORMAL, Level.CRITICAL)
    assert state.level is Level.CRITICAL and set(queued_keys) == {KEY, "ml/waits"}
    assert state.condition(KEY).reason == Level.CRITICAL.label
    responder.eviction_skipped("everything is protected")
    responder.eviction_skipped("everything is protected")
    assert events.reasons().count("EvictionSkipped") == 1  # once per reason while the pressure lasts
    responder.unblock(frozenset({KEY}))
    assert KEY not in state.evicted


async def test_an_eviction_is_marked_not_performed_by_the_responder():
    state, queued_keys, processes = MemoryState(), [], FakeProcesses()
    responder = PressureResponder(state=state, running={}, isvcs={KEY: isvc()}, processes=processes,
                                  events=FakeEvents(), enqueue=queued_keys.append)
    await responder.evict(KEY)
    assert KEY in state.evicted and queued_keys == [KEY] and processes.stopped == []
    assert state.condition(KEY).reason == "Evicted"


# -- status reporter -------------------------------------------------------------

class FakeStatus:
    def __init__(self) -> None:
        self.applied: list[dict] = []

    async def apply(self, namespace: str, name: str, body: dict):
        self.applied.append(body)
        return body

    async def clear(self, namespace, name, fields, resource_version) -> bool:
        return False


class Models(dict):
    pass


NORMAL = Condition("MemoryPressure", False, "Normal", "")


async def test_the_status_reporter_writes_once_per_change_of_intent():
    status = FakeStatus()
    reporter = StatusReporter(models=Models({"ml/qwen": model()}), status=status, events=FakeEvents(),
                              metrics=AgentMetrics(CollectorRegistry()), allowlist=EVERY_SERVICE,
                              status_mode=StatusMode.FULL)
    running = Snapshot(key=KEY, spec_hash="h", state=State.READY, pid=1, port=8081)
    for _ in range(3):
        await reporter.write(KEY, isvc(), True, process=running, endpoint=None, serving=True, memory_pressure=NORMAL)
    assert len(status.applied) == 1 and status.applied[0]["phase"] == "Ready"
    await reporter.write(KEY, isvc(), True, process=None, endpoint=None, serving=False, memory_pressure=NORMAL)
    assert len(status.applied) == 2 and status.applied[1]["phase"] != "Ready"


async def test_the_status_reporter_is_silent_for_a_service_another_mac_speaks_for():
    class Elsewhere(type(EVERY_SERVICE)):
        def speaks_for(self, key: str) -> bool:
            return False

    status = FakeStatus()
    reporter = StatusReporter(models=Models(), status=status, events=FakeEvents(),
                              metrics=AgentMetrics(CollectorRegistry()), allowlist=Elsewhere(),
                              status_mode=StatusMode.FULL)
    await reporter.write(KEY, isvc(), True, process=None, endpoint=None, serving=False, memory_pressure=NORMAL)
    assert status.applied == []
