"""The drain before a deliberate stop behind the front door (app/front_door_drain.py): the route is
pushed as starting, the stop waits for the requests in flight (bounded), and the hold ends when a
new engine takes the key or after a while. The end-to-end proof (a respawn under a steady load no
longer holds requests for the stop's whole grace) is tests/integration/test_front_door_load.py."""

from __future__ import annotations

import asyncio

from metal_agent.adapters.front_door_client import FrontDoorUnavailable
from metal_agent.app.front_door_drain import Drainer
from metal_agent.controller.front_door_table import RouteFacts, TablePusher, TableSettings, compute_table
from metal_agent.tasks import cancel_and_wait
from tests.support.wait import wait_for


class ControlSocket:
    """Stands in for the front door's control socket: the tables it was handed and the requests in
    flight per route that its GET /state reports."""

    def __init__(self) -> None:
        self.tables: list[dict] = []
        self.inflight: dict[str, int] = {}
        self.polls = 0
        self.down = False

    async def put_table(self, table: dict) -> None:
        self.tables.append(table)

    async def state(self) -> dict:
        self.polls += 1
        if self.down:
            raise FrontDoorUnavailable("GET /state: connection refused")
        return {"version": len(self.tables), "routes": {k: {"inflight": n, "queued": 0} for k, n in self.inflight.items()}}


OLD, NEW = object(), object()


def _facts() -> list[RouteFacts]:
    return [RouteFacts("ns/a", 31000, 40000, True, True, 2), RouteFacts("ns/b", 31001, 40001, True, True, 1)]


def _states(drainer: Drainer, sups: dict) -> dict[str, str]:
    table = compute_table(drainer.facts(_facts(), sups), listen_host="127.0.0.1", settings=TableSettings())
    return {r["key"]: r["state"] for r in table["routes"]}


async def test_a_drained_route_is_starting_until_a_new_engine_takes_it_or_the_hold_runs_out():
    now = [100.0]
    sups = {"ns/a": OLD, "ns/b": object()}
    socket = ControlSocket()
    drainer = Drainer(socket, TablePusher(socket, dict), lambda: sups, timeout_s=0.0, hold_s=30.0,
                      clock=lambda: now[0])
    await drainer("ns/a")
    assert _states(drainer, sups) == {"ns/a": "starting", "ns/b": "serving"}
    assert drainer.replacing("ns/a") and not drainer.replacing("ns/b")
    sups.pop("ns/a")  # stopped; the respawn has not started the next engine yet
    assert _states(drainer, sups)["ns/a"] == "starting"  # held, not "stopped" (which answers 503 at once)
    assert drainer.replacing("ns/a")  # what the rebinder asks: a respawn's gap, not a service gone
    sups["ns/a"] = NEW  # the next engine: its own readiness decides from now on
    assert not drainer.replacing("ns/a")
    assert _states(drainer, sups)["ns/a"] == "serving"
    sups["ns/a"] = OLD
    assert _states(drainer, sups)["ns/a"] == "serving"  # the hold is gone for good

    await drainer("ns/a")
    sups.pop("ns/a")  # a stop for good: no engine comes
    now[0] += 31.0
    assert not drainer.replacing("ns/a")
    assert drainer.facts(_facts(), sups) == _facts()  # the hold ran out: the facts speak for themselves


async def test_the_stop_waits_for_the_push_and_the_requests_in_flight():
    sups = {"ns/a": OLD, "ns/b": object()}
    socket = ControlSocket()
    socket.inflight["ns/a"] = 2
    holder: list[Drainer] = []
    pusher = TablePusher(socket, lambda: compute_table(holder[0].facts(_facts(), sups), listen_host="127.0.0.1",
                                                       settings=TableSettings()), debounce=0.0)
    drainer = Drainer(socket, pusher, lambda: sups, timeout_s=30.0, poll_s=0.005)
    holder.append(drainer)
    pusher.arm()
    task = asyncio.create_task(pusher.run())
    try:
        await wait_for(lambda: pusher.pushed is not None, timeout=5, what="the first push")
        drain = asyncio.create_task(drainer("ns/a"))
        await wait_for(lambda: [r["state"] for r in socket.tables[-1]["routes"]] == ["starting", "serving"],
                       timeout=5, what="the route pushed as starting")
        polls = socket.polls
        await wait_for(lambda: socket.polls >= polls + 3, timeout=5, what="more polls with requests in flight")
        assert not drain.done()
        socket.inflight["ns/a"] = 0
        await asyncio.wait_for(drain, 5)
    finally:
        await cancel_and_wait(task)


async def test_requests_that_never_finish_delay_the_stop_only_until_the_timeout():
    sups = {"ns/a": OLD}
    socket = ControlSocket()
    socket.inflight["ns/a"] = 1
    pusher = TablePusher(socket, dict)
    pusher.pushed = {"version": 1, "routes": [{"key": "ns/a", "state": "starting"}]}
    drainer = Drainer(socket, pusher, lambda: sups, timeout_s=0.1, poll_s=0.01)
    await asyncio.wait_for(drainer("ns/a"), 5)  # returns (and the stop goes on) after 0.1 s
    await asyncio.wait_for(drainer("ns/unknown"), 5)  # nothing supervised: nothing to drain


async def test_a_front_door_that_does_not_answer_delays_no_stop():
    socket = ControlSocket()
    socket.inflight["ns/a"], socket.down = 1, True
    pusher = TablePusher(socket, dict)
    pusher.pushed = {"version": 1, "routes": [{"key": "ns/a", "state": "serving"}]}  # it never took the hold
    drainer = Drainer(socket, pusher, lambda: {"ns/a": OLD}, timeout_s=60.0, poll_s=0.01)
    await asyncio.wait_for(drainer("ns/a"), 5)
    assert socket.polls == 1
