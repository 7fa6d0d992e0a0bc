"""One Mac's decisions about a service's replica Leases (core/replicas.py): pure, no API server."""

from __future__ import annotations

from metal_agent.core.leases import Replica
from metal_agent.core.placement import Wanted
from metal_agent.core.replicas import FREE, HANDOFF, plan_replicas

W = Wanted("ml/chat", "ml/qwen", 2)


def lease(index: int, holder: str | None, successor: str | None = None, key: str = "ml/chat") -> Replica:
    return Replica(key=key, index=index, holder=holder, successor=successor, resource_version=str(index + 10),
                   lease_name=f"replica.ml.chat.{index}")


def plan(leases, me="a", *, dead=(), cordoned=(), **kw):
    return plan_replicas(W, leases, me, alive=lambda n: n not in dead, cordoned=lambda n: n in cordoned, **kw)


def test_missing_unheld_and_dead_replicas_are_free():
    p = plan([lease(0, None), lease(1, "b")], dead={"b"})
    assert [(i, kind) for i, _, kind in p.free] == [(0, FREE), (1, FREE)]
    assert p.holders == frozenset()
    p = plan([])
    assert [(i, r, kind) for i, r, kind in p.free] == [(0, None, FREE), (1, None, FREE)]


def test_live_holders_are_neither_free_nor_released():
    p = plan([lease(0, "a"), lease(1, "b")])
    assert p.free == () and p.release == () and p.holders == frozenset({"a", "b"})


def test_leases_of_other_services_are_ignored():
    p = plan([lease(0, "b", key="ml/other")])
    assert len(p.free) == 2 and p.holders == frozenset()


def test_the_holder_releases_what_was_scaled_away_or_refused():
    mine = lease(1, "a")
    assert plan_replicas(Wanted("ml/chat", "ml/qwen", 1), [lease(0, "b"), mine], "a",
                         alive=lambda n: True, cordoned=lambda n: False).release == (mine,)
    assert plan([lease(0, "a")], refused=True).release == (lease(0, "a"),)
    assert plan([lease(0, "b")], refused=True).release == ()  # only one's own


def test_a_cordoned_holders_replica_is_up_for_handover_until_a_live_successor_takes_it():
    assert [(i, kind) for i, _, kind in plan([lease(0, "b"), lease(1, "c")], cordoned={"b"}).free] == [(0, HANDOFF)]
    assert plan([lease(0, "b", successor="c"), lease(1, "d")], cordoned={"b"}).free == ()
    dead_successor = plan([lease(0, "b", successor="c"), lease(1, "d")], cordoned={"b"}, dead={"c"})
    assert [(i, kind) for i, _, kind in dead_successor.free] == [(0, HANDOFF)]
    # Our own cordoned replica is not ours to bid for.
    assert plan([lease(0, "a"), lease(1, "d")], cordoned={"a"}).free == ()


def test_the_successor_takes_over_only_once_its_slice_says_ready():
    handed = lease(0, "b", successor="a")
    assert plan([handed, lease(1, "c")], cordoned={"b"}).promote == ()
    assert plan([handed, lease(1, "c")], cordoned={"b"}, announced=True).promote == (handed,)
