"""The Reconciler on its own, in the test's event loop, with its real collaborators: informers
watching the real kube-apiserver as the agent identity, the process manager running the real
llama-server, model files on the tiny GGUF, the status writer and Event recorder. No agent
process, CLI, HTTP API or watchdog around it: what is left is the control loop itself.

The memory guard is the real one with a fixed RAM size (the machine's own would make the
admission test depend on it).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from kubernetes_asyncio import client, config
from prometheus_client import CollectorRegistry

from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import CustomResource, Informer
from metal_agent.adapters.kube.status_writer import StatusWriter
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.adapters.process.records import RecordStore
from metal_agent.controller.cleanup import shutdown
from metal_agent.controller.gate import EVERY_SERVICE
from metal_agent.controller.intake import Intake
from metal_agent.controller.publishing import HostAddress, Publisher
from metal_agent.controller.reconciler import Reconciler
from metal_agent.controller.runner import Runner
from metal_agent.controller.status_reporter import StatusReporter
from metal_agent.controller.workqueue import WorkQueue
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.names import GROUP, ISVC_PLURAL, MODEL_PLURAL, VERSION
from metal_agent.core.process import State
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.memory.guard import MemoryGuard
from metal_agent.metrics import AgentMetrics
from tests.support.isvc import Cluster
from tests.support.procs import process_gone
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

RAM = 64 * 2**30


@dataclass
class Loop:
    reconciler: Reconciler
    queue: WorkQueue
    cluster: Cluster
    model: Path  # the tiny GGUF

    def process(self, name: str):
        return self.reconciler.processes.get(f"{self.cluster.ns}/{name}")

    def ready_pid(self, name: str) -> int | None:
        sup = self.process(name)
        return sup.snapshot.pid if sup and sup.snapshot.state is State.READY else None


@pytest.fixture
async def loop(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(control_plane.agent_kubeconfig), client_configuration=configuration)
    api = api_client(configuration)
    http = aiohttp.ClientSession()
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    # Built in the agent's order (app/build.py): queue and intake first, then what feeds them.
    queue = WorkQueue()
    events = EventRecorder(api, host="test-mac")
    model_files = ModelFiles(tmp_path / "models", registry=registry, on_ready=queue.add, on_progress=queue.add)
    isvc_cache: dict[str, dict] = {}
    intake = Intake(queue, isvcs=isvc_cache, model_files=model_files, events=events, metrics=metrics)
    isvcs = Informer(api, CustomResource(GROUP, VERSION, ISVC_PLURAL), intake.on_isvc_change,
                     namespaces=[namespace], cache=isvc_cache)
    models = Informer(api, CustomResource(GROUP, VERSION, MODEL_PLURAL), intake.on_model_change,
                      namespaces=[namespace])
    processes = ProcessManager(records=RecordStore(tmp_path / "state" / "processes"), log_dir=tmp_path / "logs",
                               http=http, on_change=intake.on_process_change)
    reconciler = Reconciler(
        isvcs=isvcs, models=models, processes=processes, model_files=model_files,
        memory=MemoryGuard(model_files, registry, total_ram=lambda: RAM),
        reporter=StatusReporter(models=models, status=StatusWriter(api), events=events, metrics=metrics,
                                allowlist=EVERY_SERVICE),
        publisher=Publisher(None, HostAddress(bind="127.0.0.1"), events), events=events, metrics=metrics,
        launch=LaunchSettings(llama_server=str(llama_server_bin), threads=1, mlock=False,
                              policy=SpecPolicy(model_roots=(str(tiny_model.parent),))),  # the owner's model folder
        wake=intake.wake,
    )
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    tasks = [asyncio.create_task(i.run()) for i in (isvcs, models)]
    Runner(queue, reconciler, metrics).start()
    try:
        await wait_for(lambda: reconciler.synced, timeout=60, what="the informers' first lists")
        yield Loop(reconciler, queue, cluster, tiny_model)
    finally:
        await shutdown(queue=queue, model_files=model_files, processes=processes, events=events, stop_processes=True)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await http.close()
        await api.close()


async def test_a_service_is_served_respawned_on_a_spec_change_and_stopped_on_delete(loop: Loop):
    await loop.cluster.create_isvc("chat", "tiny", contextSize=256)
    status = await loop.cluster.wait_phase("chat", "Ready")
    assert status["readyReplicas"] == 1
    pid = await wait_for(lambda: loop.ready_pid("chat"), timeout=30, what="a ready llama-server")

    await loop.cluster.patch_isvc("chat", {"contextSize": 512})
    new = await wait_for(lambda: (p := loop.ready_pid("chat")) and p != pid and p, timeout=60,
                         what="the respawn for the new spec")
    assert process_gone(pid)  # the old one stopped first: never two copies of a model
    await loop.cluster.wait_event("chat", "Started", count=2)

    await loop.cluster.delete_isvc("chat")
    await wait_for(lambda: process_gone(new), timeout=30, what="the process to stop after the delete")
    await wait_for(lambda: loop.process("chat") is None, timeout=30, what="the service to be forgotten")


async def test_an_invalid_spec_never_spawns_and_says_why(loop: Loop):
    await loop.cluster.create_isvc("bad", "tiny", contextSize=256, flashAttention=False, cacheTypeV="q8_0")
    status = await loop.cluster.wait_phase("bad", "Failed")
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert available["reason"] == "InvalidSpec" and "spec.flashAttention" in available["message"]
    await loop.queue.wait_idle()
    assert loop.process("bad") is None


async def test_a_service_whose_model_is_missing_is_left_alone_until_the_model_comes(loop: Loop):
    """Without its Model nothing says the service is for a Mac (the Model's accelerator does):
    not ours, so no process and no status write. A metal Model created later re-queues it."""
    await loop.cluster.create_isvc("later", "not-yet", contextSize=256)
    await wait_for(lambda: loop.reconciler.isvcs.get(f"{loop.cluster.ns}/later"), timeout=30, what="the informer")
    await loop.queue.wait_idle()
    assert loop.process("later") is None and not (await loop.cluster.status("later")).get("phase")
    await loop.cluster.create_model("not-yet", f"file://{loop.model}")
    await loop.cluster.wait_phase("later", "Ready")
    assert loop.ready_pid("later")
