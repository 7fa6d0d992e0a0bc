"""The Reconciler on its own: every port it is handed is a fake (tests/support/controller_fakes.py),
so what is tested is the reconcile's own decisions and the named results it hands the runner."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from metal_agent.adapters.model_files import ModelPending, ModelReady
from metal_agent.controller.publishing import HostAddress, Publisher
from metal_agent.controller.reconciler import Reconciler
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.mlx_dialect import mlx_dialect_from_help
from metal_agent.controller.results import BLOCKED_RETRY, Done, Requeue
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.core.status import Blocker
from metal_agent.memory.state import MemoryState
from metal_agent.metrics import AgentMetrics
from tests.support.controller_fakes import (FakeEvents, FakeGuard, FakeInformer, FakeModelFiles, FakeProcesses,
                                            FakeReporter, isvc, model)

KEY = "ml/chat"


class Parts:
    def __init__(self, *objects: dict, synced: bool = True, answer=None, launch: LaunchSettings | None = None) -> None:
        self.isvcs = FakeInformer(*[o for o in objects if "modelRef" in o["spec"]], synced=synced)
        self.models = FakeInformer(*[o for o in objects if "modelRef" not in o["spec"]], synced=synced)
        self.processes = FakeProcesses()
        self.model_files = FakeModelFiles(answer)
        self.guard = FakeGuard()
        self.reporter = FakeReporter()
        self.events = FakeEvents()
        self.pressure = MemoryState()
        self.woken: list[str] = []
        self.reconciler = Reconciler(
            isvcs=self.isvcs, models=self.models, processes=self.processes, model_files=self.model_files,
            memory=self.guard, reporter=self.reporter,
            publisher=Publisher(None, HostAddress(bind="10.0.0.5"), self.events), events=self.events,
            metrics=AgentMetrics(CollectorRegistry()), pressure=self.pressure, wake=self.woken.extend,
            launch=launch or LaunchSettings(llama_server="/bin/llama-server", policy=SpecPolicy(model_roots=("/models",))),
        )


async def test_nothing_is_decided_before_the_caches_are_synced():
    parts = Parts(isvc(), model(), synced=False)
    assert isinstance(await parts.reconciler.reconcile(KEY), Done)
    assert parts.processes.started == [] and parts.reporter.written == {}


async def test_a_valid_service_starts_on_the_bind_address_and_reports_its_process():
    parts = Parts(isvc(), model())
    result = await parts.reconciler.reconcile(KEY)
    assert isinstance(result, Done)
    [plan] = parts.processes.started
    assert plan.host == "10.0.0.5" and "/models/qwen.gguf" in plan.build_argv(8081)
    assert parts.reporter.written[KEY]["process"].ready
    assert KEY in parts.reconciler.managed
    # Reconciled again, unchanged: nothing respawns.
    assert isinstance(await parts.reconciler.reconcile(KEY), Done) and len(parts.processes.started) == 1


async def test_a_model_that_cannot_be_had_comes_back_later_by_itself():
    parts = Parts(isvc(), model(), answer=Blocker("ModelNotFound", "no such file"))
    result = await parts.reconciler.reconcile(KEY)
    assert result == Requeue(BLOCKED_RETRY, "ModelNotFound")
    assert parts.processes.started == [] and parts.reporter.written[KEY]["blocker"].reason == "ModelNotFound"


async def test_a_download_in_progress_waits_for_the_store_to_call_back():
    parts = Parts(isvc(), model(), answer=ModelPending("12% of 4 GiB"))
    result = await parts.reconciler.reconcile(KEY)
    assert isinstance(result, Done) and "download store" in result.why
    assert parts.reporter.written[KEY]["blocker"].reason == "ModelDownloading"


async def test_memory_refusal_waits_and_says_so_once():
    parts = Parts(isvc(), model())
    parts.guard.refuse = Blocker("InsufficientMemory", "needs 40 GiB, 20 GiB free")
    assert isinstance(await parts.reconciler.reconcile(KEY), Done)
    assert isinstance(await parts.reconciler.reconcile(KEY), Done)
    assert parts.processes.started == [] and parts.events.reasons() == ["InsufficientMemory"]
    assert parts.reporter.written[KEY]["scheduling"] == ("InsufficientMemory", "needs 40 GiB, 20 GiB free")


async def test_an_evicted_service_is_stopped_in_its_own_reconcile_and_frees_memory_for_others():
    parts = Parts(isvc(), model())
    await parts.reconciler.reconcile(KEY)
    parts.guard.waiting.add("ml/other")
    parts.pressure.evicted.add(KEY)
    parts.guard.blocked.add(KEY)
    await parts.reconciler.reconcile(KEY)
    assert parts.processes.stopped == [KEY] and len(parts.processes.started) == 1  # and it stays stopped
    assert parts.reporter.written[KEY]["blocker"].reason == "RespawnBlocked"
    assert parts.woken == ["ml/other"]  # the freed memory goes to who waited for it
    assert parts.reporter.written[KEY]["memory_pressure"].reason == "Evicted"


async def test_an_invalid_spec_starts_nothing_and_is_reported_once_per_generation():
    bad = isvc(flashAttention=False, cacheTypeV="q8_0")
    parts = Parts(bad, model())
    assert isinstance(await parts.reconciler.reconcile(KEY), Done)
    await parts.reconciler.reconcile(KEY)
    assert parts.processes.started == []
    assert parts.events.reasons() == ["InvalidSpec"]
    assert parts.reporter.written[KEY]["spec_errors"]


async def test_a_deleted_service_is_stopped_and_forgotten():
    parts = Parts(isvc(), model())
    await parts.reconciler.reconcile(KEY)
    del parts.isvcs.cache[KEY]
    assert isinstance(await parts.reconciler.reconcile(KEY), Done)
    assert parts.processes.stopped == [KEY] and KEY not in parts.reconciler.managed
    assert parts.reporter.forgotten == [KEY] and parts.model_files.forgotten == [KEY]


async def test_a_moved_address_respawns_the_engine_on_the_new_one():
    parts = Parts(isvc(), model())
    await parts.reconciler.reconcile(KEY)
    parts.reconciler.address.move("10.0.0.9", "10.0.0.9")
    await parts.reconciler.reconcile(KEY)
    assert [p.host for p in parts.processes.started] == ["10.0.0.5", "10.0.0.9"]
    assert parts.processes.stopped == [KEY] and "Respawning" in parts.events.reasons()


#: mlx-lm 0.30.5 as its --help shows it: none of the options that came later (core.mlx_dialect.OPTION_SINCE).
OLD_MLX = LaunchSettings(
    llama_server="/bin/llama-server", mlx_server=("/venv/bin/python3", "/venv/bin/mlx_lm.server"),
    policy=SpecPolicy(model_roots=("/models",)),
    mlx_dialect=mlx_dialect_from_help("usage: server.py [-h] [--model MODEL] [--host HOST] [--port PORT]"
                                      " [--draft-model DRAFT_MODEL] [--log-level LEVEL]", "0.30.5"))


def mlx_model() -> dict:
    return {"metadata": {"namespace": "ml", "name": "qwen"},
            "spec": {"source": "/models/qwen-mlx", "format": "mlx", "hardware": {"accelerator": "metal"}}}


async def test_an_older_mlx_lm_gets_only_the_options_it_parses():
    parts = Parts(isvc(), mlx_model(), answer=ModelReady(Path("/models/qwen-mlx")), launch=OLD_MLX)
    assert isinstance(await parts.reconciler.reconcile(KEY), Done)
    [plan] = parts.processes.started
    argv = plan.build_argv(8081)
    assert "/models/qwen-mlx" in argv and "--port" in argv
    assert not {"--decode-concurrency", "--prompt-cache-size", "--prefill-step-size"} & set(argv)


async def test_a_spec_the_installed_mlx_lm_is_too_old_for_is_refused_naming_both_releases():
    parts = Parts(isvc(parallelSlots=2), mlx_model(), answer=ModelReady(Path("/models/qwen-mlx")), launch=OLD_MLX)
    assert isinstance(await parts.reconciler.reconcile(KEY), Done)
    assert parts.processes.started == [] and parts.events.reasons() == ["InvalidSpec"]
    [error] = parts.reporter.written[KEY]["spec_errors"]
    assert "spec.parallelSlots: parallelSlots 2 needs mlx-lm 0.30.6 or newer" in error
    assert "the installed mlx-lm is 0.30.5" in error
