"""What a user of both LLMKube's controller and metal-agent sees of an InferenceService:
LLMKube's verdict, who wrote which status field, and every change a watch delivers
(tests/integration/test_llmkube_coexistence.py and test_fleet_llmkube.py)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import aiohttp
from kubernetes_asyncio import watch

from tests.support.fleet import slices
from tests.support.isvc import GROUP, VERSION, Cluster

WRITES = "llmkube_metal_agent_status_writes_total"
HEARTBEAT = "llmkube.ai/agent-heartbeat"


async def llmkube_ready(cluster: Cluster, name: str) -> dict | None:
    """The status, once LLMKube's controller says Ready/InferenceReady and we say the process is ready."""
    status = await cluster.status(name)
    available = next((c for c in status.get("conditions") or [] if c["type"] == "Available"), {})
    process = next((c for c in status.get("conditions") or [] if c["type"] == "MetalProcessReady"), {})
    ok = status.get("phase") == "Ready" and available.get("reason") == "InferenceReady" and process.get("status") == "True"
    return status if ok else None


def agent_fields(obj: dict) -> tuple[str | None, set[str]]:
    """(time of metal-agent's last status apply, the status fields it owns) from managedFields."""
    for entry in obj["metadata"].get("managedFields") or []:
        if entry.get("manager") == "metal-agent" and entry.get("subresource") == "status":
            return entry.get("time"), set((entry.get("fieldsV1") or {}).get("f:status", {}))
    return None, set()


class Changes:
    """Counts MODIFIED events of one InferenceService from a real watch, and what they said."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.phases: list[str] = []
        self.scheduling: list[str] = []  # every schedulingStatus seen, in order
        self.ready_replicas: list[int] = []  # every readyReplicas seen, in order
        self.statuses: list[dict] = []  # every status seen, in order
        self.count = 0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        w = watch.Watch()
        async with w.stream(self.cluster.custom.list_namespaced_custom_object, GROUP, VERSION, self.cluster.ns,
                            "inferenceservices", field_selector=f"metadata.name={self.name}",
                            resource_version=(await self.cluster.isvc(self.name))["metadata"]["resourceVersion"],
                            timeout_seconds=600) as stream:
            async for event in stream:
                if event["type"] == "MODIFIED":
                    self.count += 1
                    status = event["object"].get("status") or {}
                    self.phases.append(status.get("phase"))
                    self.scheduling.append(status.get("schedulingStatus") or "")
                    self.ready_replicas.append(status.get("readyReplicas") or 0)
                    self.statuses.append(status)

    async def __aenter__(self) -> "Changes":
        self._task = asyncio.create_task(self._run())
        return self

    def alive(self) -> None:
        """Fail if the watch has stopped: a dead watch delivers no events, and "the phase
        held" or "the writers settled" would then pass on nothing seen."""
        if self._task is not None and self._task.done():
            error = None if self._task.cancelled() else self._task.exception()
            why = repr(error) if error else "its stream ended"
            raise AssertionError(f"the watch on {self.cluster.ns}/{self.name} stopped after "
                                 f"{self.count} change(s): {why}") from error

    async def __aexit__(self, exc_type, *_) -> None:
        """Stop the watch; if it had died before (and the test did not fail already), fail."""
        if exc_type is None:
            self.alive()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # dead already: reported above
            await self._task


async def chat(address: str, port: int) -> int:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{address}:{port}/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return resp.status


async def freshest_heartbeat(cluster: Cluster, name: str) -> str:
    """The freshest heartbeat across the service's slices: the one LLMKube's controller judges by."""
    beats = [s.metadata.annotations[HEARTBEAT] for s in await slices(cluster, name)
             if HEARTBEAT in (s.metadata.annotations or {})]
    return max(beats, key=_parse)


async def heartbeats_seen(cluster: Cluster, name: str, first: str, count: int, every: float) -> bool:
    """Heartbeats are whole seconds, one every `every` s: `count` of them have passed once the
    freshest is far enough ahead of `first`."""
    return (_parse(await freshest_heartbeat(cluster, name)) - _parse(first)).total_seconds() >= every * count


def _parse(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
