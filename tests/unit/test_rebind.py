"""Moving an older agent's engines behind the front door (controller/rebind.py): the order of
things against a front door's state the test controls (the real one: test_front_door_agent.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from metal_agent.controller.rebind import Rebinder
from metal_agent.tasks import cancel_and_wait
from tests.support.wait import wait_for


def sup(host: str, ready: bool = True):
    return SimpleNamespace(plan=SimpleNamespace(host=host), snapshot=SimpleNamespace(ready=ready))


class Door:
    """The front door as the rebinder sees it: requests per route, and the table it last took."""

    def __init__(self, supervisors: dict) -> None:
        self.supervisors = supervisors
        self.inflight: dict[str, int] = {}
        self.queued: dict[str, int] = {}
        self.holding: set[str] = set()
        self.enqueued: list[str] = []
        self.polls = 0

    async def state(self) -> dict:
        self.polls += 1
        return {"routes": {k: {"inflight": self.inflight.get(k, 0), "queued": self.queued.get(k, 0)}
                           for k in self.supervisors}}

    def pushed(self) -> dict:
        return {"routes": [{"key": k, "state": "starting" if k in self.holding else "serving"}
                           for k in self.supervisors]}


async def test_each_engine_moves_alone_after_a_quiet_moment_held_and_drained():
    supervisors = {"ns/a": sup("10.0.0.5"), "ns/b": sup("0.0.0.0")}
    door = Door(supervisors)
    looked: list[int] = []

    def table() -> dict:
        looked.append(1)
        return supervisors
    rebind = Rebinder(bind=lambda: "127.0.0.1", supervisors=table, state=door.state,
                      pushed=door.pushed, changed=lambda: door.holding.__init__(rebind.holding),
                      enqueue=door.enqueued.append, poll=0.005, quiet_wait=30.0, ready_wait=30.0)
    door.inflight["ns/a"] = 1  # busy: no hold yet
    assert rebind.defers("ns/a") and rebind.defers("ns/b") and rebind.defers("ns/a")
    task = asyncio.create_task(rebind.run())
    try:
        await wait_for(lambda: door.polls > 5, timeout=5, what="the rebinder watching the busy route")
        assert rebind.holding == set() and door.enqueued == []  # never held while busy, before the wait ends
        door.inflight["ns/a"] = 0
        await wait_for(lambda: door.enqueued, timeout=5, what="ns/a cleared to move")
        assert door.enqueued == ["ns/a"] and rebind.holding == {"ns/a"} and not rebind.defers("ns/a")
        assert rebind.defers("ns/b")  # the other waits its turn, serving where it is
        supervisors["ns/a"] = sup("127.0.0.1", ready=False)  # the reconciler respawned it on loopback
        mark = len(looked)
        await wait_for(lambda: len(looked) > mark + 5, timeout=5, what="a few looks while it loads")
        assert rebind.holding == {"ns/a"} and door.enqueued == ["ns/a"]
        supervisors["ns/a"] = sup("127.0.0.1")
        await wait_for(lambda: door.enqueued == ["ns/a", "ns/b"], timeout=5, what="ns/b's turn")
        assert rebind.moved == ["ns/a"] and "ns/a" not in rebind.holding
        supervisors["ns/b"] = sup("127.0.0.1")
        await wait_for(lambda: rebind.moved == ["ns/a", "ns/b"], timeout=5, what="both moved")
        assert rebind.holding == set()
    finally:
        await cancel_and_wait(task)


async def test_a_route_that_never_quiets_is_held_after_the_wait_and_drained_first():
    supervisors = {"ns/a": sup("10.0.0.5")}
    door = Door(supervisors)
    rebind = Rebinder(bind=lambda: "127.0.0.1", supervisors=lambda: supervisors, state=door.state,
                      pushed=door.pushed, changed=lambda: door.holding.__init__(rebind.holding),
                      enqueue=door.enqueued.append, poll=0.005, quiet_wait=0.05, ready_wait=30.0)
    door.inflight["ns/a"], door.queued["ns/a"] = 1, 3
    rebind.defers("ns/a")
    task = asyncio.create_task(rebind.run())
    try:
        await wait_for(lambda: rebind.holding == {"ns/a"}, timeout=5, what="held after the quiet wait")
        mark = door.polls
        await wait_for(lambda: door.polls > mark + 5, timeout=5, what="a few looks while it drains")
        assert door.enqueued == []  # a request still in flight on the old engine: not stopped under it
        door.inflight["ns/a"] = 0  # queued requests are the held ones: they wait for the new engine
        await wait_for(lambda: door.enqueued == ["ns/a"], timeout=5, what="cleared once drained")
    finally:
        await cancel_and_wait(task)


async def test_the_next_service_waits_through_the_respawns_gap_with_no_engine():
    """A respawn stops the old engine before the new one is supervised: no supervisor then is not
    a service gone (the drain's hold says a replacement is coming), so the next one waits; with no
    hold left it is a stop for good and the next one goes."""
    supervisors = {"ns/a": sup("10.0.0.5"), "ns/b": sup("10.0.0.5")}
    door = Door(supervisors)
    replacing: set[str] = set()
    looked: list[int] = []

    def table() -> dict:
        looked.append(1)
        return supervisors
    rebind = Rebinder(bind=lambda: "127.0.0.1", supervisors=table, state=door.state,
                      pushed=door.pushed, changed=lambda: door.holding.__init__(rebind.holding),
                      enqueue=door.enqueued.append, replacing=replacing.__contains__, poll=0.005,
                      quiet_wait=30.0, ready_wait=30.0)
    rebind.defers("ns/a")
    rebind.defers("ns/b")
    task = asyncio.create_task(rebind.run())
    try:
        await wait_for(lambda: door.enqueued == ["ns/a"], timeout=5, what="ns/a cleared to move")
        replacing.add("ns/a")  # drained and stopped; the new engine not yet started
        del supervisors["ns/a"]
        mark = len(looked)
        await wait_for(lambda: len(looked) > mark + 5, timeout=5, what="a few looks in the gap")
        assert door.enqueued == ["ns/a"] and rebind.moved == [] and rebind.holding == {"ns/a"}
        supervisors["ns/a"] = sup("127.0.0.1", ready=False)  # the new engine, loading
        replacing.discard("ns/a")
        mark = len(looked)
        await wait_for(lambda: len(looked) > mark + 5, timeout=5, what="a few looks while it loads")
        assert door.enqueued == ["ns/a"] and rebind.moved == []
        supervisors["ns/a"] = sup("127.0.0.1")
        await wait_for(lambda: door.enqueued == ["ns/a", "ns/b"], timeout=5, what="ns/b's turn")
        del supervisors["ns/b"]  # stopped for good (deleted, scaled to zero): no hold
        await wait_for(lambda: rebind.moved == ["ns/a", "ns/b"], timeout=5, what="ns/b settled as gone")
    finally:
        await cancel_and_wait(task)
