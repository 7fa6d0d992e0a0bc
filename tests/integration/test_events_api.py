"""The Event recorder against the real kube-apiserver: the answers tests/unit/test_events.py
stages with a small HTTP stand-in, here from the real thing (RBAC, validation, deletion).

- a repeat bumps the stored Event's count (a real PATCH);
- an Event deleted meanwhile (expired after its hour, or removed) is created again;
- an Event the API server finds invalid (422) is dropped, counted, and holds nothing back;
- a denial (403) that persists is a refusal, counted; one that ends (RBAC granted while
  the recorder retries, as after an API server restart) loses nothing.

A create that hangs is tests/integration/test_api_faults.py (a frozen API server).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter

from metal_agent.adapters.kube.client import api_client
from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.core.backoff import Backoff
from tests.support.controlplane import write_kubeconfig
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

RETRY = Backoff(initial=0.05, factor=2.0, cap=0.2, jitter=0.5)


@contextlib.asynccontextmanager
async def recorder(kubeconfig: Path) -> AsyncIterator[tuple[EventRecorder, Counter]]:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    api = api_client(configuration)
    dropped = Counter("events_dropped", "test", ["reason"], registry=CollectorRegistry())
    rec = EventRecorder(api, host="test-mac", retry=RETRY, dropped=dropped)
    try:
        yield rec, dropped
    finally:
        await rec.close()
        await api.close()


async def stored(admin_api, namespace: str, name: str) -> list[client.CoreV1Event]:
    events = await client.CoreV1Api(admin_api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}")
    return events.items


def isvc(namespace: str, name: str) -> dict:
    return {"namespace": namespace, "name": name, "uid": f"uid-{name[:20]}"}


async def test_a_repeat_bumps_the_stored_event(control_plane, namespace, admin_api):
    async with recorder(control_plane.agent_kubeconfig) as (rec, dropped):
        for _ in range(3):
            rec.emit(isvc(namespace, "svc"), "Unhealthy", "no answer")
            await asyncio.wait_for(rec.flush(), 30)
    [event] = await stored(admin_api, namespace, "svc")
    assert event.count == 3 and event.reason == "Unhealthy"


async def test_an_event_deleted_meanwhile_is_created_again(control_plane, namespace, admin_api):
    async with recorder(control_plane.agent_kubeconfig) as (rec, dropped):
        rec.emit(isvc(namespace, "svc"), "Unhealthy", "no answer")
        await asyncio.wait_for(rec.flush(), 30)
        [first] = await stored(admin_api, namespace, "svc")
        await client.CoreV1Api(admin_api).delete_namespaced_event(first.metadata.name, namespace)
        rec.emit(isvc(namespace, "svc"), "Unhealthy", "no answer")  # a PATCH of the deleted one: 404
        await asyncio.wait_for(rec.flush(), 30)
    [again] = await stored(admin_api, namespace, "svc")
    assert again.metadata.name != first.metadata.name and again.count == 1
    assert dropped.labels("rejected")._value.get() == 0


async def test_an_invalid_event_is_dropped_counted_and_holds_nothing_back(control_plane, namespace, admin_api):
    async with recorder(control_plane.agent_kubeconfig) as (rec, dropped):
        rec.emit(isvc(namespace, "a/b"), "Bad", "m")  # its Event name "a/b.<hex>" is invalid: 422
        rec.emit(isvc(namespace, "svc"), "Good", "m")
        await asyncio.wait_for(rec.flush(), 30)
    assert [e.reason for e in await stored(admin_api, namespace, "svc")] == ["Good"]
    assert [e.reason for e in (await client.CoreV1Api(admin_api).list_namespaced_event(namespace)).items] == ["Good"]
    assert dropped.labels("rejected")._value.get() == 1


async def test_a_service_with_the_longest_name_gets_its_events(control_plane, namespace, admin_api):
    """253 characters, the most a name may have: its Event's name is longer, and the API server
    takes it (an Event's name is checked as a path segment, not as a DNS subdomain)."""
    name = ".".join(["a" * 63] * 4)[:253].rstrip(".")
    async with recorder(control_plane.agent_kubeconfig) as (rec, dropped):
        rec.emit(isvc(namespace, name), "Started", "m")
        await asyncio.wait_for(rec.flush(), 30)
    [event] = await stored(admin_api, namespace, name)
    assert event.involved_object.name == name
    assert dropped.labels("rejected")._value.get() == 0


@pytest.fixture
def unprivileged_kubeconfig(control_plane, tmp_path) -> tuple[str, Path]:
    """An identity the API server knows (a client certificate of its CA) and RBAC grants nothing."""
    user = f"events-nobody-{tmp_path.name[-8:]}".lower().replace("_", "-")
    pair = control_plane.pki.client(f"nobody-{tmp_path.name}", user)
    return user, write_kubeconfig(tmp_path / "nobody.kubeconfig", control_plane.url, control_plane.pki.ca_cert,
                                  pair.cert, pair.key, user)


async def test_a_denial_that_persists_is_a_refusal(namespace, admin_api, unprivileged_kubeconfig):
    _, kubeconfig = unprivileged_kubeconfig
    async with recorder(kubeconfig) as (rec, dropped):
        rec.emit(isvc(namespace, "svc"), "Evicted", "memory pressure")
        await asyncio.wait_for(rec.flush(), 60)
    assert dropped.labels("rejected")._value.get() == 1
    assert await stored(admin_api, namespace, "svc") == []


async def test_a_denial_that_ends_while_retrying_loses_nothing(namespace, admin_api, unprivileged_kubeconfig):
    """403 at first (as from an API server whose RBAC cache is cold after a restart), then
    granted: the Event is delivered. The grant is made at the first denial and awaited until
    the API server applies it, so the retries that follow meet it, however slow the machine."""
    user, kubeconfig = unprivileged_kubeconfig
    rbac = client.RbacAuthorizationV1Api(admin_api)
    async with recorder(kubeconfig) as (rec, dropped):
        create = rec.core.create_namespaced_event
        denials = 0

        async def grant_at_first_denial(*args, **kwargs):
            nonlocal denials
            try:
                return await create(*args, **kwargs)
            except ApiException as err:
                if err.status == 403 and denials == 0:
                    await grant_events(rbac, namespace, user)
                    await wait_for(lambda: may_create_events(admin_api, namespace, user), timeout=30,
                                   what="the RoleBinding to take effect")
                denials += err.status == 403
                raise

        rec.core.create_namespaced_event = grant_at_first_denial
        rec.emit(isvc(namespace, "svc"), "Evicted", "memory pressure")
        await asyncio.wait_for(rec.flush(), 60)
    assert denials >= 1
    assert [e.reason for e in await stored(admin_api, namespace, "svc")] == ["Evicted"]
    assert dropped.labels("rejected")._value.get() == 0


async def grant_events(rbac: client.RbacAuthorizationV1Api, namespace: str, user: str) -> None:
    await rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "events-writer"},
        "rules": [{"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]}]})
    await rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "events-writer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "events-writer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})


async def may_create_events(admin_api, namespace: str, user: str) -> bool:
    review = await client.AuthorizationV1Api(admin_api).create_subject_access_review({
        "spec": {"user": user, "resourceAttributes": {"namespace": namespace, "verb": "create", "resource": "events"}}})
    return bool(review.status.allowed)
