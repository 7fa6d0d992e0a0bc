"""Load on demand in the controller (controller/on_demand.py with the Reconciler): who sleeps, who
wakes, whom memory admission unloads. The ports are the fakes of tests/support/controller_fakes.py;
the front door's activity is its `GET /state` answer in the shape frontdoor/server.py writes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from metal_agent.controller.on_demand import INVALID, NEEDS_FRONT_DOOR, OnDemand
from metal_agent.controller.publishing import HostAddress, Publisher
from metal_agent.controller.reconciler import Reconciler
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.on_demand import IDLE_AFTER, ON_DEMAND
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.memory.state import MemoryState
from metal_agent.metrics import AgentMetrics
from tests.support.controller_fakes import (FakeEvents, FakeGuard, FakeInformer, FakeModelFiles, FakeProcesses,
                                            FakeReporter, isvc, model)


def on_demand_isvc(name: str, idle: str = "10s", **spec) -> dict:
    raw = isvc(name, **spec)
    raw["metadata"]["annotations"] = {ON_DEMAND: "true", IDLE_AFTER: idle}
    return raw


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Parts:
    def __init__(self, *objects: dict, front_door: bool = True) -> None:
        self.isvcs = FakeInformer(*[o for o in objects if "modelRef" in o["spec"]])
        self.processes = FakeProcesses()
        self.guard = FakeGuard()
        self.reporter = FakeReporter()
        self.events = FakeEvents()
        self.queued: list[str] = []
        self.changes = 0
        self.routes: dict[str, dict] = {}  # the front door's activity per route
        self.clock = Clock()
        managed: dict = {}
        self.on_demand = OnDemand(enabled=front_door, events=self.events, isvcs=self.isvcs.cache, running=managed,
                                  enqueue=self.queued.append, activity=self._activity, changed=self._changed,
                                  clock=self.clock)
        self.reconciler = Reconciler(
            isvcs=self.isvcs, models=FakeInformer(*[o for o in objects if "modelRef" not in o["spec"]]),
            processes=self.processes, model_files=FakeModelFiles(None), memory=self.guard, reporter=self.reporter,
            publisher=Publisher(None, HostAddress(bind="127.0.0.1"), self.events), events=self.events,
            metrics=AgentMetrics(CollectorRegistry()), pressure=MemoryState(), wake=lambda keys: None,
            launch=LaunchSettings(llama_server="/bin/llama-server", policy=SpecPolicy(model_roots=("/models",))),
            managed=managed, on_demand=self.on_demand if front_door else None)

    async def _activity(self) -> dict:
        return {"version": 3, "routes": self.routes}

    def _changed(self) -> None:
        self.changes += 1

    def idle_route(self, key: str, last_active: float | None = None) -> None:
        self.routes[key] = {"inflight": 0, "queued": 0, "last_request": last_active, "last_active": last_active}


async def test_an_idle_on_demand_service_is_unloaded_after_its_idle_time_and_woken_by_a_request():
    parts = Parts(on_demand_isvc("chat", "10s"), model())
    await parts.reconciler.reconcile("ml/chat")
    assert "ml/chat" in parts.processes.supervisors
    assert parts.on_demand._next_due() == 10.0  # the loop sleeps this long: no polling meanwhile
    parts.idle_route("ml/chat", last_active=parts.clock.now + 5)  # a request 5 s after the load
    parts.clock.now += 10
    await parts.on_demand._unload_idle()
    assert not parts.on_demand.is_asleep("ml/chat")  # 5 s since its last request: not yet
    assert parts.on_demand._next_due() == 5.0
    parts.clock.now += 5
    await parts.on_demand._unload_idle()
    assert parts.on_demand.is_asleep("ml/chat") and parts.queued == ["ml/chat"]
    assert parts.events.emitted[-1] == ("chat", "UnloadedIdle", "unloaded: idle for 10s")
    assert parts.on_demand.route_state("ml/chat") == "sleeping" and parts.changes == 1

    await parts.reconciler.reconcile("ml/chat")  # the reconcile does the stopping
    assert parts.processes.stopped == ["ml/chat"] and "ml/chat" not in parts.guard.committed
    assert "idle for 10s" in parts.reporter.written["ml/chat"]["idle"]
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == ["ml/chat"] and len(parts.processes.started) == 1  # stays asleep

    assert await parts.on_demand.wake("ml/chat") == "loading"
    assert await parts.on_demand.wake("ml/chat") == "loading"  # a second request: one load
    assert parts.events.reasons().count("LoadingOnDemand") == 1
    assert parts.on_demand.route_state("ml/chat") == "starting"  # held, not refused, until it runs
    await parts.reconciler.reconcile("ml/chat")
    assert len(parts.processes.started) == 2
    # The fake engine is ready at once: "loading" is over as soon as the status says it serves.
    assert parts.reporter.written["ml/chat"]["loading"] is None and parts.on_demand.route_state("ml/chat") is None


async def test_a_busy_service_is_not_unloaded_and_its_clock_moves_on():
    parts = Parts(on_demand_isvc("chat", "10s"), model())
    await parts.reconciler.reconcile("ml/chat")
    parts.routes["ml/chat"] = {"inflight": 1, "queued": 2, "last_request": 0.0, "last_active": 0.0}
    parts.clock.now += 60
    await parts.on_demand._unload_idle()
    assert not parts.on_demand.is_asleep("ml/chat") and parts.on_demand._next_due() == 10.0


async def test_the_front_door_not_answering_unloads_nothing():
    parts = Parts(on_demand_isvc("chat", "10s"), model())
    await parts.reconciler.reconcile("ml/chat")

    async def away() -> dict:
        raise OSError("no socket")

    parts.on_demand.activity = away
    parts.clock.now += 60
    await parts.on_demand._unload_idle()
    assert not parts.on_demand.is_asleep("ml/chat") and 0 < parts.on_demand._next_due() <= 5.0


async def test_memory_short_unloads_the_least_recently_used_idle_on_demand_service_only():
    old, new, busy = on_demand_isvc("old"), on_demand_isvc("new"), on_demand_isvc("busy")
    always, kept = isvc("always"), on_demand_isvc("kept", evictionProtection=True)
    parts = Parts(old, new, busy, always, kept, isvc("big"), model())
    for name in ("old", "new", "busy", "always", "kept"):
        await parts.reconciler.reconcile(f"ml/{name}")
    parts.idle_route("ml/old", 100.0)
    parts.idle_route("ml/new", 200.0)
    parts.idle_route("ml/always", 1.0)
    parts.idle_route("ml/kept", 1.0)
    parts.routes["ml/busy"] = {"inflight": 1, "queued": 0, "last_active": 0.0}
    parts.guard.capacity = 4  # five run: `big` needs two to go
    await parts.reconciler.reconcile("ml/big")
    assert parts.processes.stopped == ["ml/old", "ml/new"] and "ml/big" in parts.processes.supervisors
    assert ("old", "UnloadedForMemory", "unloaded: evicted for ml/big under memory shortage") in parts.events.emitted
    assert parts.on_demand.is_asleep("ml/old") and parts.on_demand.is_asleep("ml/new")

    parts.guard.capacity = 3  # nothing idle is left to unload: `extra` waits, nobody else goes
    parts.isvcs.cache["ml/extra"] = isvc("extra")
    await parts.reconciler.reconcile("ml/extra")
    assert parts.processes.stopped == ["ml/old", "ml/new"]
    assert parts.reporter.written["ml/extra"]["blocker"].reason == "InsufficientMemory"


async def test_a_bad_annotation_is_reported_once_and_the_service_runs_always_loaded():
    raw = on_demand_isvc("chat", "soon")
    parts = Parts(raw, model())
    await parts.reconciler.reconcile("ml/chat")
    await parts.reconciler.reconcile("ml/chat")
    assert "ml/chat" in parts.processes.supervisors
    problem = parts.reporter.written["ml/chat"]["degraded"]
    assert problem.reason == INVALID and IDLE_AFTER in problem.message and "always-loaded" in problem.message
    assert parts.events.reasons() == [INVALID]
    assert parts.on_demand._next_due() is None  # never unloaded


async def test_a_bad_annotation_on_a_sleeping_service_loads_it_again():
    raw = on_demand_isvc("chat", "10s")
    parts = Parts(raw, model())
    await parts.reconciler.reconcile("ml/chat")
    parts.idle_route("ml/chat")
    parts.clock.now += 11
    await parts.on_demand._unload_idle()
    await parts.reconciler.reconcile("ml/chat")
    assert "ml/chat" not in parts.processes.supervisors
    raw["metadata"]["annotations"][ON_DEMAND] = "yes"
    await parts.reconciler.reconcile("ml/chat")
    assert "ml/chat" in parts.processes.supervisors and not parts.on_demand.is_asleep("ml/chat")


async def test_without_the_front_door_the_annotation_is_refused_with_a_condition():
    parts = Parts(on_demand_isvc("chat"), model(), front_door=False)
    await parts.reconciler.reconcile("ml/chat")
    assert "ml/chat" in parts.processes.supervisors
    assert parts.reporter.written["ml/chat"]["degraded"].reason == NEEDS_FRONT_DOOR
    assert parts.events.reasons() == [NEEDS_FRONT_DOOR]


async def test_a_deleted_service_is_forgotten():
    parts = Parts(on_demand_isvc("chat"), model())
    await parts.reconciler.reconcile("ml/chat")
    del parts.isvcs.cache["ml/chat"]
    await parts.reconciler.reconcile("ml/chat")
    assert parts.on_demand.policies == {} and parts.on_demand._next_due() is None


async def test_a_request_that_slips_in_as_it_is_unloaded_keeps_it_loaded():
    parts = Parts(on_demand_isvc("chat", "10s"), model())
    await parts.reconciler.reconcile("ml/chat")
    parts.idle_route("ml/chat")
    parts.clock.now += 11
    await parts.on_demand._unload_idle()
    assert parts.on_demand.is_asleep("ml/chat")
    parts.routes["ml/chat"]["inflight"] = 1  # arrived before the front door held its route
    await parts.reconciler.reconcile("ml/chat")
    assert parts.processes.stopped == [] and not parts.on_demand.is_asleep("ml/chat")
    assert parts.events.reasons()[-1] == "UnloadCancelled"
    assert parts.on_demand._next_due() == 10.0  # its clock starts again


async def test_after_an_agent_restart_a_model_that_slept_sleeps_on_and_one_that_ran_is_taken_over():
    parts = Parts(on_demand_isvc("chat"), on_demand_isvc("other"), model())
    parts.routes["ml/chat"] = {"inflight": 0, "queued": 0, "last_active": None, "state": "sleeping"}
    parts.routes["ml/other"] = {"inflight": 0, "queued": 0, "last_active": None, "state": "stopped"}
    await parts.reconciler.reconcile("ml/chat")
    await parts.reconciler.reconcile("ml/other")
    assert [p.key for p in parts.processes.started] == ["ml/other"]  # only what did not sleep loads
    assert "before the agent restarted" in parts.reporter.written["ml/chat"]["idle"]
    assert await parts.on_demand.wake("ml/chat") == "loading"
    await parts.reconciler.reconcile("ml/chat")
    assert "ml/chat" in parts.processes.supervisors


def test_the_front_doors_route_state_follows_sleep_and_wake():
    from metal_agent.controller.front_door_table import RouteFacts, route_state

    def facts(hint, *, ready=False, running=False):
        return RouteFacts(key="ml/chat", port=31000, engine_port=8081 if running else None, ready=ready,
                          running=running, max_inflight=1, hint=hint)

    # Being unloaded: the front door holds new requests before the engine is stopped.
    assert route_state(facts("sleeping", ready=True, running=True)) == "sleeping"
    assert route_state(facts("sleeping")) == "sleeping"
    assert route_state(facts("starting")) == "starting"  # woken, not spawned yet: hold, do not refuse
    assert route_state(facts("starting", ready=True, running=True)) == "serving"
    assert route_state(facts(None)) == "stopped"


async def test_a_route_the_front_door_does_not_have_yet_has_no_request_but_a_silent_front_door_unloads_nobody():
    parts = Parts(on_demand_isvc("old"), isvc("big"), model())
    await parts.reconciler.reconcile("ml/old")
    parts.guard.capacity = 1
    await parts.reconciler.reconcile("ml/big")  # the table with `old` not pushed yet: no route there
    assert parts.processes.stopped == ["ml/old"] and "ml/big" in parts.processes.supervisors

    parts = Parts(on_demand_isvc("old"), isvc("big"), model())
    await parts.reconciler.reconcile("ml/old")

    async def away() -> dict:
        raise OSError("no socket")

    parts.on_demand.activity = away
    parts.guard.capacity = 1
    await parts.reconciler.reconcile("ml/big")
    assert parts.processes.stopped == [] and parts.reporter.written["ml/big"]["blocker"].reason == "InsufficientMemory"


async def test_metal_agent_status_says_idle_and_loading_on_demand():
    parts = Parts(on_demand_isvc("chat", "10s"), model())
    await parts.reconciler.reconcile("ml/chat")
    assert parts.on_demand.label("ml/chat", "serving") == "serving"
    parts.idle_route("ml/chat")
    parts.clock.now += 11
    await parts.on_demand._unload_idle()
    assert parts.on_demand.label("ml/chat", "sleeping") == "Idle"
    await parts.on_demand.wake("ml/chat")
    assert parts.on_demand.label("ml/chat", "starting") == "Loading on demand"
    assert parts.on_demand.label("ml/chat", "serving") == "serving"


async def test_scaled_to_zero_a_sleeping_service_is_neither_asleep_nor_woken():
    raw = on_demand_isvc("chat", "10s")
    parts = Parts(raw, model())
    await parts.reconciler.reconcile("ml/chat")
    parts.idle_route("ml/chat")
    parts.clock.now += 11
    await parts.on_demand._unload_idle()
    await parts.reconciler.reconcile("ml/chat")
    raw["spec"]["replicas"] = 0
    await parts.reconciler.reconcile("ml/chat")
    assert parts.on_demand.route_state("ml/chat") is None  # the front door's rule: stopped, 503 at once
    assert await parts.on_demand.wake("ml/chat") == "not on demand"
    raw["spec"]["replicas"] = 1
    await parts.reconciler.reconcile("ml/chat")
    assert "ml/chat" in parts.processes.supervisors  # scaled up again: loaded, its idle clock anew
