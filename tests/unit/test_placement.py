"""Placement rules (core/placement.py) and the fleet's Lease data (core/leases.py): pure, fast."""

from __future__ import annotations

import datetime as dt

import pytest

from metal_agent.core.leases import (
    Liveness,
    MemberInfo,
    fence_deadline,
    member_lease,
    member_name,
    parse_member,
    parse_replica,
    replica_lease,
    replica_lease_name,
)
from metal_agent.core.memory import GiB
from metal_agent.core.placement import Member, Wanted, bid_delay, placement_condition, rank, selector_matches, \
    unschedulable_message, wanted_from, why_not
from metal_agent.core.process import Snapshot, State
from metal_agent.core.status import StatusInputs, compute_status

STUDIO = Member("studio", {"llmkube.ai/chip": "M2-Ultra", "size": "big", "llmkube.ai/memory-gib": "192"},
                budget_bytes=144 * GiB, committed_bytes=20 * GiB)
LAPTOP = Member("laptop", {"llmkube.ai/chip": "M5-Max", "size": "small", "llmkube.ai/memory-gib": "64"},
                budget_bytes=48 * GiB, committed_bytes=0)
MINI = Member("mini", {"llmkube.ai/chip": "M4", "size": "small", "llmkube.ai/memory-gib": "32"},
              budget_bytes=21 * GiB, committed_bytes=0, models=frozenset({"ml/qwen"}))


def isvc(**spec) -> dict:
    return {"metadata": {"namespace": "ml", "name": "chat"}, "spec": {"modelRef": "qwen", **spec}}


def affinity(*terms) -> dict:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


def test_node_selector_requires_every_label():
    w = wanted_from(isvc(nodeSelector={"size": "small", "llmkube.ai/chip": "M4"}), "ml/qwen", 1)
    assert [m.name for m in (STUDIO, LAPTOP, MINI) if selector_matches(w, m)] == ["mini"]


@pytest.mark.parametrize("expr, matching", [
    ({"key": "size", "operator": "In", "values": ["big", "huge"]}, ["studio"]),
    ({"key": "size", "operator": "NotIn", "values": ["big"]}, ["laptop", "mini"]),
    ({"key": "gpu", "operator": "NotIn", "values": ["x"]}, ["studio", "laptop", "mini"]),  # absent key passes NotIn
    ({"key": "size", "operator": "Exists"}, ["studio", "laptop", "mini"]),
    ({"key": "gpu", "operator": "DoesNotExist"}, ["studio", "laptop", "mini"]),
    ({"key": "llmkube.ai/memory-gib", "operator": "Gt", "values": ["48"]}, ["studio", "laptop"]),
    ({"key": "llmkube.ai/memory-gib", "operator": "Lt", "values": ["64"]}, ["mini"]),
    ({"key": "size", "operator": "Gt", "values": ["1"]}, []),  # not an integer: no match
    ({"key": "size", "operator": "Sideways", "values": ["big"]}, []),
])
def test_affinity_operators(expr, matching):
    w = wanted_from(isvc(affinity=affinity({"matchExpressions": [expr]})), "ml/qwen", 1)
    assert [m.name for m in (STUDIO, LAPTOP, MINI) if selector_matches(w, m)] == matching


def test_affinity_terms_are_ored_and_expressions_anded():
    w = wanted_from(isvc(affinity=affinity(
        {"matchExpressions": [{"key": "size", "operator": "In", "values": ["small"]},
                              {"key": "llmkube.ai/chip", "operator": "In", "values": ["M4"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["studio"]}]},
    )), "ml/qwen", 1)
    assert [m.name for m in (STUDIO, LAPTOP, MINI) if selector_matches(w, m)] == ["studio", "mini"]


def test_empty_terms_match_nothing_and_a_malformed_selector_matches_nobody():
    assert not selector_matches(wanted_from(isvc(affinity=affinity({})), "ml/qwen", 1), STUDIO)
    assert not selector_matches(wanted_from(isvc(affinity=affinity()), "ml/qwen", 1), STUDIO)
    assert not selector_matches(wanted_from(isvc(nodeSelector={"size": 3}), "ml/qwen", 1), STUDIO)
    assert selector_matches(wanted_from(isvc(), "ml/qwen", 1), STUDIO)


def test_rank_prefers_the_model_on_disk_then_free_memory_then_name():
    w = wanted_from(isvc(), "ml/qwen", 1)
    assert [m.name for m in rank(w, [STUDIO, LAPTOP, MINI])] == ["mini", "studio", "laptop"]
    twin = Member("aaa", LAPTOP.labels, budget_bytes=LAPTOP.budget_bytes)
    assert [m.name for m in rank(wanted_from(isvc(), "ml/other", 1), [LAPTOP, twin])] == ["aaa", "laptop"]


def test_rank_excludes_cordoned_unfit_allowlisted_out_and_current_holders():
    w = wanted_from(isvc(), "ml/qwen", 2)
    cordoned = Member("studio", STUDIO.labels, cordoned=True, budget_bytes=STUDIO.budget_bytes)
    unfit = Member("laptop", LAPTOP.labels, budget_bytes=LAPTOP.budget_bytes, unfit={"ml/chat": "needs 60 GiB"})
    listed = Member("other", {}, budget_bytes=GiB, allowlist=("somebody-else",))
    assert rank(w, [cordoned, unfit, listed, MINI], holding=frozenset({"mini"})) == []
    assert why_not(w, cordoned) == "cordoned (drained)"
    assert why_not(w, unfit) == "needs 60 GiB"
    assert why_not(w, listed) == "not in its --inference-service-allowlist"
    assert why_not(w, MINI, frozenset({"mini"})) == "already serves a replica"
    assert why_not(w, Member("x", {}, allowlist=("ml/chat",))) is None


def test_bid_delay_is_rank_times_step_and_none_for_the_ineligible():
    w = wanted_from(isvc(nodeSelector={"size": "small"}), "ml/qwen", 1)
    members = [STUDIO, LAPTOP, MINI]
    assert bid_delay(w, members, "mini", 1.5) == 0.0
    assert bid_delay(w, members, "laptop", 1.5) == 1.5
    assert bid_delay(w, members, "studio", 1.5) is None


def test_unschedulable_message_gives_reasons_and_numbers():
    w = wanted_from(isvc(nodeSelector={"size": "small"}), "ml/qwen", 1)
    unfit = Member("laptop", LAPTOP.labels, budget_bytes=48 * GiB, committed_bytes=8 * GiB,
                   unfit={"ml/chat": "InsufficientMemory: needs 60.00 GiB"})
    message = unschedulable_message(w, [STUDIO, unfit])
    assert message.startswith("0/2 Macs can take it (nodeSelector size=small): ")
    assert "laptop (40.00 GiB of 48.00 GiB free): InsufficientMemory: needs 60.00 GiB" in message
    assert "studio (124.00 GiB of 144.00 GiB free): does not match the nodeSelector/affinity" in message
    partly = unschedulable_message(wanted_from(isvc(), "ml/qwen", 2), [MINI], frozenset({"mini"}))
    assert partly.startswith("1/2 replicas placed; 0/1 Macs can take another replica")


def test_member_names_are_dns_labels():
    assert member_name("Jane's MacBook Pro.local") == "jane-s-macbook-pro"
    assert member_name("---") == "mac"
    assert len(member_name("x" * 100)) == 63


def test_member_lease_round_trips():
    info = MemberInfo(Member("studio", {"size": "big"}, cordoned=True, budget_bytes=10, committed_bytes=4,
                             models=frozenset({"ml/qwen"}), allowlist=("a",), unfit={"ml/x": "no"}),
                      host="studio.local", chip="Apple M2 Ultra", total_bytes=20, serving=("ml/chat#0",), version="1")
    body = member_lease(info, duration_s=40, now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    assert body["metadata"]["name"] == "member.studio"
    assert body["metadata"]["labels"]["size"] == "big"
    # kubectl-friendly status labels, never read back as placement labels
    assert {k: body["metadata"]["labels"][k] for k in ("llmkube.ai/free-gib", "llmkube.ai/serving",
                                                        "llmkube.ai/cordoned")} == \
        {"llmkube.ai/free-gib": "0", "llmkube.ai/serving": "1", "llmkube.ai/cordoned": "true"}
    assert body["spec"] == {"holderIdentity": "studio", "leaseDurationSeconds": 40,
                            "renewTime": "2026-01-01T00:00:00.000000Z"}
    assert parse_member(body) == info
    assert parse_member({**body, "metadata": {**body["metadata"], "annotations": {"llmkube.ai/member": "{"}}}) is None
    assert parse_member(replica_lease("ml/chat", 0, holder="x", duration_s=1, now=dt.datetime.now())) is None


def test_replica_lease_round_trips_and_updates_carry_the_resource_version():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    body = replica_lease("ml/chat.v1", 1, holder="mini", successor="laptop", duration_s=40, now=now,
                         resource_version="42")
    assert body["metadata"]["name"] == replica_lease_name("ml/chat.v1", 1) == "replica.ml.chat.v1.1"
    assert body["metadata"]["resourceVersion"] == "42"
    replica = parse_replica({**body, "metadata": {**body["metadata"], "resourceVersion": "43"}})
    assert (replica.key, replica.index, replica.holder, replica.successor, replica.resource_version) == \
        ("ml/chat.v1", 1, "mini", "laptop", "43")
    free = replica_lease("ml/chat", 0, holder=None, duration_s=40, now=now)
    assert "holderIdentity" not in free["spec"] and "resourceVersion" not in free["metadata"]
    assert parse_replica(free).holder is None


def test_liveness_follows_the_observers_clock_not_renew_time():
    seen = Liveness()
    seen.observe("mini", "1", 10, now=100.0)
    assert seen.alive("mini", 110.0) and not seen.alive("mini", 110.1)
    seen.observe("mini", "1", 10, now=105.0)  # the same version again (a resync) is no renewal
    assert not seen.alive("mini", 110.1)
    seen.observe("mini", "2", 10, now=109.0)
    assert seen.alive("mini", 119.0) and seen.expires_in("mini", 110.0) == pytest.approx(9.0)
    assert not seen.alive("ghost", 0.0)


def test_a_member_fences_itself_before_anyone_may_take_over():
    assert fence_deadline(100.0, 40.0, 10.0) == 130.0  # others: not before 140
    assert fence_deadline(100.0, 6.0, 1.0) == 105.0
    assert fence_deadline(100.0, 4.0, 3.0) == 102.0  # never more than half the duration's margin lost
    w = Wanted("ml/chat", "ml/qwen", 1)
    assert w.namespace == "ml" and w.name == "chat"


def test_placement_condition_names_every_mac_and_what_is_missing():
    full = placement_condition(2, {0: ("studio", True), 1: ("mini", False)})
    assert (full.type, full.status, full.reason) == ("FleetPlacement", True, "Placed")
    assert full.message == "replica 0 on studio (ready), replica 1 on mini (starting)"
    short = placement_condition(3, {1: ("mini", True)}, unplaced="0/3 Macs can take another replica: ...")
    assert (short.status, short.reason) == (False, "Unschedulable")
    assert short.message == "replica 1 on mini (ready); 2 replicas unplaced: 0/3 Macs can take another replica: ..."
    assert placement_condition(1, {}).reason == "Placing"
    assert placement_condition(1, {0: ("a", True), 1: ("b", True)}).message == "replica 0 on a (ready)"  # scaled down


def test_status_counts_replicas_ready_on_other_macs_and_carries_the_placement():
    ready = Snapshot(key="ml/chat", spec_hash="x", state=State.READY, pid=1, port=8000)
    placed = placement_condition(2, {0: ("a", True), 1: ("b", True)})
    status = compute_status(StatusInputs(generation=1, wants_process=True, desired_replicas=2, process=ready,
                                         ready_elsewhere=1, placement=placed), None, "2026-01-01T00:00:00Z")
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2
    cond = next(c for c in status["conditions"] if c["type"] == "FleetPlacement")
    assert cond["status"] == "True" and cond["message"] == placed.message
    alone = compute_status(StatusInputs(generation=1, wants_process=True, desired_replicas=2, process=ready),
                           None, "2026-01-01T00:00:00Z")
    assert alone["phase"] == "Progressing" and alone["readyReplicas"] == 1
    assert "FleetPlacement" not in {c["type"] for c in alone["conditions"]}
