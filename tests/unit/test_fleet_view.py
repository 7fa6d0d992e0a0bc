"""What `/v1/fleet` and `/metrics` say of the fleet, read through the parts' public questions
(fleet/view.py, fleet/metrics.py), on fakes of the ports (tests/support/fleet_fakes.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from metal_agent.fleet.metrics import FleetCollector
from tests.support.fleet_fakes import Fakes, build
from tests.support.manifests import isvc_doc, model_doc

KEY = "default/chat"


async def test_the_view_lists_every_member_and_where_a_draining_macs_replicas_go(tmp_path):
    fakes = Fakes()
    fakes.models["default/tiny"] = model_doc()
    fakes.isvcs[KEY] = isvc_doc()
    fakes.synced.set()
    parts = build(fakes, tmp_path)
    fakes.leases.renew_other("b", budget_bytes=32 << 30)
    fakes.leases.renew_other("c")
    fakes.leases.hold(KEY, 0, "a")
    await parts.membership.set_cordoned(True)
    fakes.leases.deliver(parts.gate.on_lease_change)
    fakes.clock.advance(1)

    view = parts.view.render()
    assert [row["member"] for row in view["members"]] == ["a", "b", "c"]
    a, b, _ = view["members"]
    assert a["cordoned"] and a["holds"] == [f"{KEY}#0"] and a["expires_in_s"] is None
    assert b["alive"] and b["free_bytes"] == 32 << 30 and b["expires_in_s"] == 39.0
    assert view["cordoned"] and not view["fenced"]
    assert view["draining"] == {f"{KEY}#0": "waiting for b to take it"}  # b has the most room
    assert (tmp_path / "a" / "fleet-cordoned").exists()  # a drained Mac stays drained after a restart

    await parts.membership.set_cordoned(False)
    assert parts.view.render()["draining"] == {} and not (tmp_path / "a" / "fleet-cordoned").exists()


async def test_the_collector_counts_held_replicas_members_fence_and_renewals(tmp_path):
    fakes = Fakes()
    parts = build(fakes, tmp_path)
    registry = CollectorRegistry()
    registry.register(FleetCollector(parts.membership))
    metric = lambda name, **labels: registry.get_sample_value("llmkube_metal_agent_" + name, labels)  # noqa: E731
    assert metric("fleet_fenced") == 1  # never renewed
    await parts.membership.renew()
    fakes.leases.renew_other("b")
    fakes.leases.hold(KEY, 0, "a")
    fakes.leases.deliver(parts.gate.on_lease_change)
    assert metric("fleet_fenced") == 0 and metric("fleet_replicas_held") == 1
    assert metric("fleet_members", state="alive") == 2 and metric("fleet_members", state="expired") == 0
    fakes.clock.advance(41)  # b silent for longer than its Lease
    fakes.leases.down = True
    await parts.membership.renew()
    assert metric("fleet_members", state="alive") == 0 and metric("fleet_members", state="expired") == 2
    assert metric("fleet_lease_renewals_total", outcome="ok") == 1
    assert metric("fleet_lease_renewals_total", outcome="failed") == 1


async def test_build_fleet_hands_every_part_its_collaborators_and_nothing_is_patched_after(tmp_path):
    from types import SimpleNamespace

    from kubernetes_asyncio.client import ApiClient

    from metal_agent.adapters.kube.fleet_registrar import FleetRegistrar
    from metal_agent.fleet.wiring import build_fleet
    from tests.support.fleet_fakes import FakeEvents, FakeMemory, FakeModelFiles, Store

    cfg = SimpleNamespace(member_name=None, fleet_namespace="metal-agent", labels={"size": "big"}, lease_duration=40.0,
                          lease_renew_interval=10.0, fleet_bid_step=2.0, memory_fraction=None,
                          default_runtime="llama-server", policy=None, namespaces=("ml",), allowlist=("chat",),
                          resync_period=600.0)
    api = ApiClient()
    try:
        parts = build_fleet(cfg, api, host="Mac-Studio.local", chip="Apple M4 Max", total_ram=64 << 30,
                            version="test", isvcs=Store(), models=Store(), memory=FakeMemory(),
                            model_files=FakeModelFiles(), events=FakeEvents(), on_key=lambda key: None,
                            process_ready=lambda key: False, waiting=lambda key: None, address=lambda: "10.0.0.2",
                            state_dir=tmp_path, registrar_kwargs={"host": "Mac-Studio.local"})
    finally:
        await api.close()
    assert set(parts.loops()) == {"watch-leases", "fleet"}
    assert parts.watch.synced is parts.membership.synced  # the watch's first list is what makes the gate ready
    assert parts.watch.on_change == parts.gate.on_lease_change
    assert isinstance(parts.registrar, FleetRegistrar) and parts.registrar.holds == parts.gate.serves
    assert parts.placer.slices is parts.registrar
    assert parts.settings.member == "mac-studio" and parts.settings.namespaces == ("ml",)
    assert parts.settings.labels["size"] == "big" and parts.gate.refusal("ml", "coder").startswith("InferenceService")
