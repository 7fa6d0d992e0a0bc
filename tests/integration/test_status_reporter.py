"""StatusReporter on its own, writing through the real StatusWriter and EventRecorder to the
real kube-apiserver as the agent identity (RBAC on). The Model cache is a dict: the reporter
only looks Models up, and an informer would add nothing but a watch.

What it promises (metal_agent/controller/status_reporter.py): one write per change of intent, none
after a restart when the object already holds it, each write whole (phase beside its own
reasons), only its own fields when sharing, nothing for a service another Mac speaks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from kubernetes_asyncio import client, config
from prometheus_client import CollectorRegistry

from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.status_writer import StatusWriter
from metal_agent.controller.gate import EVERY_SERVICE
from metal_agent.core.conditions import Condition
from metal_agent.core.process import ExitInfo, ExitReason, Snapshot, State
from metal_agent.core.status_owner import StatusMode
from metal_agent.metrics import AgentMetrics
from metal_agent.controller.status_reporter import StatusReporter
from tests.support.isvc import GROUP, VERSION, Cluster

pytestmark = pytest.mark.integration

NORMAL = Condition("MemoryPressure", False, "Normal", "")


@dataclass
class Models:
    """The reporter's view of Models (an Informer's `get`), filled by the test."""

    objects: dict

    def get(self, key: str) -> dict | None:
        return self.objects.get(key)


class NotThisMac:
    """A fleet gate under which another Mac speaks for every service."""

    def speaks_for(self, key: str) -> bool:
        return False


@pytest.fixture
async def agent_writer(control_plane):
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(control_plane.agent_kubeconfig), client_configuration=configuration)
    api = api_client(configuration)
    events = EventRecorder(api, host="test-mac")
    yield StatusWriter(api), events
    await events.close()
    await api.close()


def reporter(agent_writer, *, mode=StatusMode.AUTO, allowlist=EVERY_SERVICE, models=None) -> tuple[StatusReporter, AgentMetrics]:
    status, events = agent_writer
    metrics = AgentMetrics(CollectorRegistry())
    return StatusReporter(models=Models(models or {}), status=status, events=events, metrics=metrics,
                          allowlist=allowlist, status_mode=mode), metrics


def writes(metrics: AgentMetrics) -> float:
    return metrics.status_writes._value.get()


def snap(state: State, **kw) -> Snapshot:
    return Snapshot(key="k", spec_hash="h" * 64, state=state, pid=kw.pop("pid", 42), port=8081, **kw)


CRASHED = snap(State.BACKOFF, pid=None, restarts=2,
               last_exit=ExitInfo(ExitReason.PROCESS_EXITED, 1, ("error: unsupported cache type: turbo3",), 0.0))


async def write(rep: StatusReporter, cluster: Cluster, name: str, process: Snapshot | None, **kw) -> dict:
    raw = await cluster.isvc(name)
    await rep.write(f"{cluster.ns}/{name}", raw, True, process=process, endpoint=None, serving=False,
                    memory_pressure=NORMAL, **kw)
    return await cluster.isvc(name)


def conditions(obj: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj["status"].get("conditions") or []}


async def test_one_write_per_change_of_intent_each_whole(admin_api, namespace, agent_writer):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", "file:///models/tiny.gguf")
    await cluster.create_isvc("svc", "tiny")
    rep, metrics = reporter(agent_writer)

    loading = await write(rep, cluster, "svc", snap(State.STARTING))
    assert loading["status"]["phase"] == "Progressing"
    assert conditions(loading)["Available"] == ("False", "ModelLoading")
    assert writes(metrics) == 1

    again = await write(rep, cluster, "svc", snap(State.STARTING))  # nothing changed: no write
    assert writes(metrics) == 1 and again["metadata"]["resourceVersion"] == loading["metadata"]["resourceVersion"]

    crashed = await write(rep, cluster, "svc", CRASHED)
    assert crashed["status"]["phase"] == "Failed"
    assert conditions(crashed)["Available"] == ("False", "ProcessExited")  # in the same object as the phase
    assert conditions(crashed)["Degraded"] == ("True", "CrashLoopBackOff")
    assert "turbo3" in next(c["message"] for c in crashed["status"]["conditions"] if c["type"] == "Available")
    assert writes(metrics) == 2


async def test_a_restarted_reporter_does_not_rewrite_what_the_object_holds(admin_api, namespace, agent_writer):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", "file:///models/tiny.gguf")
    await cluster.create_isvc("svc", "tiny")
    first, _ = reporter(agent_writer)
    written = await write(first, cluster, "svc", snap(State.READY))
    assert written["status"]["phase"] == "Ready"

    second, metrics = reporter(agent_writer)  # a new agent: no memory but the object's managedFields
    after = await write(second, cluster, "svc", snap(State.READY))
    assert writes(metrics) == 0
    assert after["metadata"]["resourceVersion"] == written["metadata"]["resourceVersion"]


async def test_sharing_with_llmkube_writes_only_the_agents_own_conditions(admin_api, namespace, agent_writer):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", "file:///models/tiny.gguf")
    await cluster.create_isvc("svc", "tiny")
    # LLMKube's controller's part, written by another field manager.
    await cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "inferenceservices", "svc",
        {"status": {"phase": "Pending", "conditions": [{"type": "Available", "status": "False", "reason": "Waiting",
                                                        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}},
        _content_type="application/merge-patch+json")
    rep, metrics = reporter(agent_writer, mode=StatusMode.SHARED)
    obj = await write(rep, cluster, "svc", snap(State.READY))
    assert writes(metrics) == 1
    assert obj["status"]["phase"] == "Pending"  # LLMKube's, untouched
    assert conditions(obj)["Available"] == ("False", "Waiting")
    assert conditions(obj)["MetalProcessReady"] == ("True", "Ready")


async def test_a_service_another_mac_speaks_for_is_not_written(admin_api, namespace, agent_writer):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", "file:///models/tiny.gguf")
    await cluster.create_isvc("svc", "tiny")
    rep, metrics = reporter(agent_writer, allowlist=NotThisMac())
    obj = await write(rep, cluster, "svc", CRASHED)
    assert writes(metrics) == 0 and not (obj.get("status") or {}).get("phase")
