"""Fleet placement (metal_agent/fleet/) on its own: two "Macs" as two sets of fleet parts
in the test's event loop, no agent process, no network namespace, no root.

Real where they talk to the cluster, as the agent identity (RBAC on): each Mac's
LeaseClient writes its member and replica Leases, each has its own lease watch (the
Informer the agent runs) and its own watches of Models and InferenceServices, and Events
go through the real EventRecorder. Real where they decide: ModelFiles says whether the
model is on this Mac's disk, MemoryGuard holds the committed memory (none: no process
runs). The reconciler is not there: `on_key` records what it would have been told, and
`process_ready` says no process is ready (none is started). Nor are EndpointSlices: no
slice is announced, and marking a silent Mac's slices changes none.

Leases are short (6 s, renewed every second) as in tests/support/fleet.py. The bid step is
a few seconds so that the order of bids, not the machine's speed, decides who bids first.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.informer import CustomResource, Informer
from metal_agent.adapters.kube.leases import GROUP, PLURAL, VERSION, LeaseClient
from metal_agent.adapters.model_cache import CachePaths
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.core.claim import Allowlist
from metal_agent.core.leases import COORDINATION, ISVC_NAMESPACE_LABEL, member_lease_name, parse_replica, replica_lease_name
from metal_agent.core.names import GROUP as ISVC_GROUP, ISVC_PLURAL, MODEL_PLURAL, VERSION as ISVC_VERSION
from metal_agent.fleet.gate import FleetGate
from metal_agent.fleet.placer import UNSCHEDULABLE
from metal_agent.fleet.settings import FleetSettings
from metal_agent.fleet.wiring import FleetParts, assemble
from metal_agent.memory.guard import MemoryGuard
from tests.support.isvc import Cluster
from tests.support.kube import api_client
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

FLEET_NS = "metal-agent"
RAM = 64 * 2**30
BID_STEP = 5.0  # seconds per place in line: the margin the preferred Mac has over the next
URL = "https://models.example.invalid/tiny-remote.gguf"  # never fetched: the file is put in the cache


class NoSlices:
    def announced(self, key: str) -> bool:
        return False

    async def mark_member_not_ready(self, dead: str, namespaces) -> int:
        return 0


@dataclass
class Mac:
    parts: FleetParts
    model_files: ModelFiles
    told: list[str] = field(default_factory=list)  # keys the reconciler would have been re-queued for

    @property
    def gate(self) -> FleetGate:
        return self.parts.gate

    @property
    def me(self) -> str:
        return self.parts.settings.member


@pytest.fixture
async def fleet_of(control_plane, admin_api, namespace, tmp_path):
    """`await fleet_of({suffix: labels})` -> Macs, running until the test ends; their Leases are removed after."""
    tag = secrets.token_hex(2)
    admin_leases = LeaseClient(admin_api, FLEET_NS)
    stack = contextlib.AsyncExitStack()
    tasks: list[asyncio.Task] = []
    members: list[str] = []

    async def start(specs: dict[str, dict[str, str]]) -> list[Mac]:
        macs = []
        for suffix, labels in specs.items():
            name = f"{suffix}-{tag}"
            members.append(name)
            api = await api_client(control_plane.agent_kubeconfig)  # each Mac its own connection
            stack.push_async_callback(api.close)
            events = EventRecorder(api, host=name)
            stack.push_async_callback(events.close)
            registry = CollectorRegistry()
            model_files = ModelFiles(tmp_path / name / "models", registry=registry)
            isvcs = Informer(api, CustomResource(ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL), lambda o, n: None,
                             namespaces=[namespace])
            models = Informer(api, CustomResource(ISVC_GROUP, ISVC_VERSION, MODEL_PLURAL), lambda o, n: None,
                              namespaces=[namespace])
            told: list[str] = []
            synced = asyncio.Event()
            (tmp_path / name).mkdir(exist_ok=True)
            parts = assemble(FleetSettings(member=name, namespace=FLEET_NS, labels=labels, lease_duration=6.0,
                                           renew_interval=1.0, bid_step=BID_STEP, host=name, total_ram=RAM,
                                           namespaces=(namespace,)),
                             leases=LeaseClient(api, FLEET_NS), synced=synced, isvcs=isvcs, models=models,
                             allowlist=Allowlist(), memory=MemoryGuard(model_files, registry, total_ram=lambda: RAM),
                             model_files=model_files, events=events, version="test", state_dir=tmp_path / name,
                             on_key=told.append, process_ready=lambda key: False, waiting=lambda key: None,
                             registrar=lambda gate: NoSlices())
            leases = Informer(api, CustomResource(*COORDINATION), parts.gate.on_lease_change, namespaces=(FLEET_NS,),
                              synced=synced)
            tasks.extend(asyncio.create_task(c) for c in (isvcs.run(), models.run(), leases.run(), parts.loop.run()))
            macs.append(Mac(parts, model_files, told))
        return macs

    try:
        yield start
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stack.aclose()
        for member in members:
            with contextlib.suppress(Exception):
                await admin_leases.delete(member_lease_name(member), await admin_leases.resource_version(member_lease_name(member)))
        await admin_leases.api.delete_collection_namespaced_custom_object(
            GROUP, VERSION, FLEET_NS, PLURAL, label_selector=f"{ISVC_NAMESPACE_LABEL}={namespace}")


async def replica_holder(admin_api, key: str, index: int = 0) -> str | None:
    version = await LeaseClient(admin_api, FLEET_NS).resource_version(replica_lease_name(key, index))
    if version is None:
        return None
    lease = await LeaseClient(admin_api, FLEET_NS).api.get_namespaced_custom_object(
        GROUP, VERSION, FLEET_NS, PLURAL, replica_lease_name(key, index))
    return parse_replica(lease).holder


def knows(mac: Mac, other: Mac, model: str | None = None) -> bool:
    info = mac.parts.membership.others().get(other.me)
    return mac.gate.ready() and info is not None and (model is None or model in info.member.models)


async def test_a_free_replica_is_taken_by_the_mac_with_the_model_on_disk(admin_api, namespace, tiny_model, fleet_of):
    cluster = Cluster(admin_api, namespace)
    model = await cluster.create_model("remote", URL)
    a, b = await fleet_of({"a": {"size": "big"}, "b": {"size": "big"}})
    # Only b has the file, as a finished download in its cache. By name a would come first.
    cached = CachePaths.for_url(b.model_files.cache_dir, URL, "tiny-remote.gguf").final
    cached.parent.mkdir(parents=True)
    shutil.copyfile(tiny_model, cached)
    key = f"{namespace}/chat"
    model_key = f"{namespace}/{model['metadata']['name']}"

    # Both must have heard of each other (and a of b's model) before the service exists,
    # or the first to look would rank itself alone.
    await wait_for(lambda: knows(a, b, model_key) and knows(b, a), timeout=60, what="the two Macs to see each other")
    assert model_key not in a.parts.membership.my_info().member.models

    await cluster.create_isvc("chat", "remote", contextSize=256)
    holder = await wait_for(lambda: replica_holder(admin_api, key), timeout=60, what="replica 0 to be taken")
    assert holder == b.me
    events = await cluster.wait_event("chat", "Placed", timeout=30)
    assert "Placed" in events
    [placed] = [e for e in await cluster.events("chat") if e.reason == "Placed"]
    assert placed.message.startswith(f"replica 0 placed on {b.me} (model on disk")

    served_by_b = f"served by {b.me}, not by this Mac ({a.me})"
    await wait_for(lambda: a.gate.refusal(namespace, "chat") == served_by_b, timeout=30,
                   what="a's lease watch to show b holding the replica")
    assert b.gate.serves(key) and key in b.told  # the reconciler would have been told to start it
    assert not a.gate.serves(key)
    assert key not in a.parts.local.reserved  # a never won anything to reserve memory for


async def test_a_service_no_mac_may_take_is_recorded_unschedulable_and_nobody_bids(admin_api, namespace, fleet_of):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("remote", URL)
    [a] = await fleet_of({"a": {"size": "small"}})
    await wait_for(lambda: a.gate.ready(), timeout=60, what="a's Lease and lease watch")

    await cluster.create_isvc("huge", "remote", contextSize=256, nodeSelector={"size": "huge"})
    key = f"{namespace}/huge"
    blocker = await wait_for(lambda: a.gate.unplaced(key), timeout=60, what="the refusal to be recorded")
    assert blocker.reason == UNSCHEDULABLE and blocker.phase == "Pending"
    assert blocker.message.startswith("0/1 Macs can take it (nodeSelector size=huge)")
    assert f"{a.me} (" in blocker.message and "does not match the nodeSelector/affinity" in blocker.message
    assert key in a.told  # so that the status says it (a speaks for it: no Mac serves it)
    assert a.gate.speaks_for(key) and not a.gate.serves(key)
    condition, _ = a.gate.placement(key)
    assert condition is not None and condition.status is False
    assert await replica_holder(admin_api, key) is None  # nothing was bid for
    leases = await LeaseClient(admin_api, FLEET_NS).list(f"{ISVC_NAMESPACE_LABEL}={namespace}")
    assert leases == []
