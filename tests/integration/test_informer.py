"""The informer against a real API server: watch, 410 Gone, relist without spurious deletes."""

from __future__ import annotations

import asyncio

import pytest

from metal_agent.adapters.kube.informer import CustomResource, Informer, _Gone
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

ISVCS = CustomResource("inference.llmkube.dev", "v1alpha1", "inferenceservices")


class Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (what, name)

    def __call__(self, old, new) -> None:
        what = "added" if old is None else "deleted" if new is None else "resync" if old is new else "modified"
        self.seen.append((what, (new or old)["metadata"]["name"]))


async def test_watch_delivers_changes(agent_api, admin_api, namespace):
    """Latency is a figure for bench/control_loop.py; here: the event arrives, slimmed."""
    changes = Changes()
    informer = Informer(agent_api, ISVCS, changes, namespaces=[namespace])
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        await Cluster(admin_api, namespace).create_isvc("fresh", "m")
        await wait_for(lambda: ("added", "fresh") in changes.seen, timeout=10, what="ADDED event")
        assert informer.get(f"{namespace}/fresh")["spec"]["modelRef"] == "m"
        assert "managedFields" not in informer.get(f"{namespace}/fresh")["metadata"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_expired_resource_version_is_gone(agent_api, admin_api, namespace):
    await Cluster(admin_api, namespace).create_isvc("a", "m")
    informer = Informer(agent_api, ISVCS, Changes(), namespaces=[namespace])
    with pytest.raises(_Gone):
        await informer._watch(namespace, "1")  # far older than anything the server keeps


async def test_relist_reports_only_real_differences(agent_api, admin_api, namespace):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_isvc("kept", "m")
    await cluster.create_isvc("changed", "m")
    changes = Changes()
    informer = Informer(agent_api, ISVCS, changes, namespaces=[namespace])
    await informer._relist(namespace)
    assert sorted(changes.seen) == [("added", "changed"), ("added", "kept")]

    # While "disconnected": one object changes, one is deleted, one appears.
    await cluster.patch_isvc("changed", {"contextSize": 4096})
    await cluster.delete_isvc("kept")
    await cluster.create_isvc("new", "m")
    changes.seen.clear()
    await informer._relist(namespace)
    assert sorted(changes.seen) == [("added", "new"), ("deleted", "kept"), ("modified", "changed")]

    # A relist with nothing changed says nothing: no spurious deletes or updates.
    changes.seen.clear()
    await informer._relist(namespace)
    assert changes.seen == []


async def test_failed_list_keeps_the_cache(agent_api, admin_api, namespace, control_plane):
    await Cluster(admin_api, namespace).create_isvc("survivor", "m")
    changes = Changes()
    informer = Informer(agent_api, ISVCS, changes, namespaces=[namespace])
    await informer._relist(namespace)
    await control_plane.stop_apiserver()
    try:
        with pytest.raises(Exception):
            await informer._relist(namespace)
    finally:
        await control_plane.start_apiserver()
    assert informer.get(f"{namespace}/survivor") is not None  # an error is never read as a delete
    assert ("deleted", "survivor") not in changes.seen
