"""The agent's API client and Event recorder against a real kube-apiserver that freezes or goes away.

A frozen API server (SIGSTOP) is what a Mac sees after a network change
without a reset: connections are accepted or kept, nothing ever answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import AsyncIterator

import aiohttp
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.core.backoff import Backoff
from metal_agent.metrics import AgentMetrics
from tests.support.procs import stopped
from tests.support.slowness import scaled
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def agent_client(kubeconfig, total: float = 2.0) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    api = api_client(configuration, default_timeout=aiohttp.ClientTimeout(total=total, connect=total))
    try:
        yield api
    finally:
        await api.close()


@contextlib.asynccontextmanager
async def frozen(control_plane) -> AsyncIterator[None]:
    """The API server stopped, every thread of it: SIGSTOP only queues the stop, and
    a thread not yet scheduled since could still answer the next request."""
    control_plane.apiserver.signal(signal.SIGSTOP)
    try:
        await wait_for(lambda: stopped(control_plane.apiserver.pid), timeout=30, what="kube-apiserver stopped")
        yield
    finally:
        control_plane.apiserver.signal(signal.SIGCONT)


async def events_in(admin_api, namespace: str) -> list:
    return (await client.CoreV1Api(admin_api).list_namespaced_event(namespace)).items


def list_isvcs(api: client.ApiClient, namespace: str, **kwargs):
    return client.CustomObjectsApi(api).list_namespaced_custom_object(
        "inference.llmkube.dev", "v1alpha1", namespace, "inferenceservices", **kwargs)


# The warm-up call pays a fresh TLS handshake, client-certificate auth, RBAC and the
# first list in a new namespace: seconds on a busy machine, so not the 2 s under test.
WARM_UP = aiohttp.ClientTimeout(total=60, connect=30)


async def test_a_frozen_api_server_costs_a_call_its_timeout_not_forever(control_plane, namespace):
    async with agent_client(control_plane.agent_kubeconfig, total=2.0) as api:
        await list_isvcs(api, namespace, _request_timeout=WARM_UP)  # a kept-alive connection, as the agent has
        async with frozen(control_plane):
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(list_isvcs(api, namespace), 30)  # 30: only a regression guard
            assert time.monotonic() - started < scaled(10)
        await wait_for(lambda: _answers(api, namespace), timeout=30, what="the API server to answer again")


async def _answers(api: client.ApiClient, namespace: str) -> bool:
    """One list that succeeds; a thawed server catching up may time out or answer 429/5xx first."""
    try:
        await list_isvcs(api, namespace)
        return True
    except (asyncio.TimeoutError, aiohttp.ClientError):
        return False
    except ApiException as err:
        if err.status == 429 or err.status >= 500:
            return False
        raise


async def test_events_raised_while_the_api_server_is_frozen_are_delivered_after(control_plane, namespace, admin_api):
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    async with agent_client(control_plane.agent_kubeconfig, total=2.0) as api:
        rec = EventRecorder(api, host="test-mac", call_timeout=2.0, dropped=metrics.events_dropped,
                            retry=Backoff(initial=0.2, factor=2.0, cap=1.0, jitter=0.5))
        isvc = {"namespace": namespace, "name": "frozen", "uid": "uid-frozen"}
        calls = 0
        create = rec.core.create_namespaced_event

        async def counted_create(*args, **kwargs):
            nonlocal calls
            calls += 1
            return await create(*args, **kwargs)

        rec.core.create_namespaced_event = counted_create
        try:
            async with frozen(control_plane):
                rec.emit(isvc, "ProcessExited", "exit code 1", warning=True)
                rec.emit(isvc, "Restarting", "restart #1")
                rec.emit(isvc, "ProcessExited", "exit code 1", warning=True)  # a repeat: aggregated
                await wait_for(lambda: calls >= 2, timeout=30, what="attempts timing out during the freeze")
                assert rec.pending == 2
            await asyncio.wait_for(rec.flush(), 60)
        finally:
            await rec.close()
    events = {e.reason: e for e in await events_in(admin_api, namespace) if e.involved_object.name == "frozen"}
    assert set(events) == {"ProcessExited", "Restarting"}
    assert events["ProcessExited"].count == 2 and events["ProcessExited"].type == "Warning"
    assert registry.get_sample_value("llmkube_metal_agent_events_dropped_total", {"reason": "overflow"}) is None


async def test_events_raised_while_the_api_server_is_down_are_delivered_when_it_returns(control_plane, namespace, admin_api):
    async with agent_client(control_plane.agent_kubeconfig) as api:
        rec = EventRecorder(api, host="test-mac", retry=Backoff(initial=0.2, factor=2.0, cap=1.0, jitter=0.5))
        failures = 0
        create = rec.core.create_namespaced_event

        async def counted_create(*args, **kwargs):
            nonlocal failures
            try:
                return await create(*args, **kwargs)
            except Exception:
                failures += 1
                raise

        rec.core.create_namespaced_event = counted_create
        try:
            await control_plane.stop_apiserver()
            try:
                rec.emit({"namespace": namespace, "name": "down", "uid": "uid-down"}, "Evicted", "memory pressure")
                await wait_for(lambda: failures >= 3, timeout=30, what="failed attempts while the API is down")
            finally:
                await control_plane.start_apiserver()
            await asyncio.wait_for(rec.flush(), 60)
        finally:
            await rec.close()
    reasons = [e.reason for e in await events_in(admin_api, namespace) if e.involved_object.name == "down"]
    assert reasons == ["Evicted"]
