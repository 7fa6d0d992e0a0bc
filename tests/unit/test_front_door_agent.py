"""The agent's side of the front door, pure parts and the pusher: stable-port allocation,
the table computed from the controller's facts, and its push (debounced, versioned, resent)."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from metal_agent.adapters.port_book_file import PortBookFile, free_port
from metal_agent.controller.front_door_table import (
    RouteFacts, TablePusher, TableSettings, compute_table, gather, route_state,
)
from metal_agent.controller.stable_ports import StablePorts
from metal_agent.core.stable_ports import BadBook, PortBook
from metal_agent.tasks import cancel_and_wait
from tests.support.wait import wait_for


# -- allocation (pure) ---------------------------------------------------------------------

def test_a_key_keeps_its_port_and_no_two_keys_share_one():
    book = PortBook().assign("ns/a", 31000).assign("ns/b", 31001)
    assert book.assign("ns/a", 31000) is book
    with pytest.raises(ValueError, match="already held"):
        book.assign("ns/c", 31000)
    assert book.missing(["ns/a", "ns/c", "ns/b", "ns/c"]) == ["ns/c"]


def test_release_and_keep_only_free_the_ports_of_services_gone_for_good():
    book = PortBook().assign("ns/a", 31000).assign("ns/b", 31001)
    assert book.release(["ns/a"]).ports == {"ns/b": 31001}
    assert book.keep_only(["ns/b", "ns/zzz"]).ports == {"ns/b": 31001}
    assert book.release(["ns/none"]) is book


@pytest.mark.parametrize("data", [
    None, [], {"version": 2, "ports": {}}, {"version": 1, "ports": {"ns/a": "80"}},
    {"version": 1, "ports": {"ns/a": 31000, "ns/b": 31000}}, {"version": 1, "ports": {"../x": 31000}},
    {"version": 1, "ports": {"ns/a": 70000}}, {"version": 1, "ports": {"ns/a": True}},
])
def test_a_book_that_is_not_one_is_refused(data):
    with pytest.raises(BadBook):
        PortBook.from_json(data)


def test_the_book_round_trips_through_json():
    book = PortBook().assign("ns/b", 31001).assign("ns/a", 31000)
    assert PortBook.from_json(json.loads(json.dumps(book.to_json()))) == book


# -- the file and StablePorts --------------------------------------------------------------

async def test_ports_survive_a_restart_and_are_released_for_good(tmp_path):
    first = StablePorts(PortBookFile(tmp_path), host=lambda: "127.0.0.1")
    first.load()
    a = await first.ensure("ns/a")
    b = await first.ensure("ns/b")
    assert a != b and await first.ensure("ns/a") == a
    assert stat.S_IMODE(os.stat(tmp_path / "front-door-ports.json").st_mode) & 0o022 == 0
    again = StablePorts(PortBookFile(tmp_path), host=lambda: "127.0.0.1")  # the next agent
    again.load()
    assert (again.port("ns/a"), again.port("ns/b")) == (a, b)
    await again.release(["ns/a"])
    third = StablePorts(PortBookFile(tmp_path), host=lambda: "127.0.0.1")
    third.load()
    assert third.port("ns/a") is None and third.port("ns/b") == b


def test_a_corrupt_or_foreign_writable_book_starts_afresh(tmp_path):
    path = tmp_path / "front-door-ports.json"
    path.write_text("{not json")
    assert PortBookFile(tmp_path).load() == PortBook()
    path.write_text(json.dumps({"version": 1, "ports": {"ns/a": 31000}}))
    assert PortBookFile(tmp_path).load().port("ns/a") == 31000
    os.chmod(path, 0o666)
    assert PortBookFile(tmp_path).load() == PortBook()


def test_free_port_avoids_ports_held_by_other_services():
    first = free_port("127.0.0.1")
    assert 0 < first < 65536
    assert free_port("127.0.0.1", avoid={first}) != first


# -- the table (pure) ----------------------------------------------------------------------

def facts(key="ns/a", port=31000, engine_port=40123, ready=True, running=True, slots=4,
          host="127.0.0.1") -> RouteFacts:
    return RouteFacts(key, port, engine_port, ready, running, slots, host)


def test_state_follows_the_engine():
    assert route_state(facts()) == "serving"
    assert route_state(facts(ready=False)) == "starting"
    assert route_state(facts(ready=False, running=False, engine_port=None)) == "stopped"


def test_the_table_has_one_route_per_service_with_upstream_only_while_serving():
    settings = TableSettings(client_port=9999, queue=8, queue_timeout_s=12.5)
    table = compute_table([facts("ns/b", 31001, ready=False), facts("ns/a", 31000, slots=0)],
                          listen_host="192.168.1.20", settings=settings)
    assert table == {"listen_host": "192.168.1.20", "client_port": 9999, "routes": [
        {"key": "ns/a", "model": "a", "port": 31000, "upstream": "127.0.0.1:40123", "state": "serving",
         "max_inflight": 1, "queue": 8, "queue_timeout_s": 12.5},
        {"key": "ns/b", "model": "b", "port": 31001, "upstream": None, "state": "starting",
         "max_inflight": 4, "queue": 8, "queue_timeout_s": 12.5}]}


def test_an_older_agents_engine_is_reached_where_it_listens_and_a_held_route_holds():
    # Adopted from an agent without the front door: the engine listens on the Mac's address
    # (or every address) until it is moved onto loopback (controller/rebind.py).
    table = compute_table([facts("ns/a", host="192.168.1.20"), facts("ns/b", 31001, host="0.0.0.0"),
                           facts("ns/c", 31002, host="fd7a::5"), facts("ns/d", 31003)],
                          listen_host="192.168.1.20", settings=TableSettings(), held={"ns/d"})
    assert [(r["upstream"], r["state"]) for r in table["routes"]] == [
        ("192.168.1.20:40123", "serving"), ("127.0.0.1:40123", "serving"), ("[fd7a::5]:40123", "serving"),
        (None, "starting")]
    stopped = compute_table([facts(running=False, ready=False, engine_port=None)], listen_host="h",
                            settings=TableSettings(), held={"ns/a"})
    assert stopped["routes"][0]["state"] == "stopped"  # nothing to hold for: answered 503 at once


def test_access_json_passes_through_opaque():
    table = compute_table([facts()], listen_host="h", settings=TableSettings(), access={"mode": "cluster"},
                          keys=lambda key: {"digests": [key]})
    assert table["access"] == {"mode": "cluster"}
    assert table["routes"][0]["access"] == {"digests": ["ns/a"]}


class _Snap:
    def __init__(self, port, ready):
        self.port, self.ready = port, ready


class _Sup:
    def __init__(self, port, ready, host="127.0.0.1"):
        self.snapshot = _Snap(port, ready)
        self.plan = type("P", (), {"host": host})


class _Managed:
    def __init__(self, slots):
        self.workload = type("W", (), {"isvc": type("I", (), {"spec": type("S", (), {"parallel_slots": slots})})})


def test_gather_reads_ports_processes_and_slots_and_skips_deleted_services():
    found = gather({"ns/a": 31000, "ns/b": 31001, "ns/gone": 31002}, isvcs={"ns/a": {}, "ns/b": {}},
                   managed={"ns/a": _Managed(3)}, supervisors={"ns/a": _Sup(40000, True, "10.0.0.5")})
    assert found == [RouteFacts("ns/a", 31000, 40000, True, True, 3, "10.0.0.5"),
                     RouteFacts("ns/b", 31001, None, False, False, 1)]


# -- the pusher ----------------------------------------------------------------------------

class FakeFrontDoor:
    """Stands in for the front door's control socket (the real one is fd-proxy's)."""

    def __init__(self, version=0):
        self.version = version
        self.tables: list[dict] = []
        self.down = False

    async def put_table(self, table):
        if self.down:
            raise OSError("connection refused")
        self.tables.append(table)
        self.version = table["version"]

    async def state(self):
        if self.down:
            raise OSError("connection refused")
        return {"version": self.version, "routes": {}}


async def test_pusher_versions_changes_debounces_bursts_and_resends_after_a_restart():
    door = FakeFrontDoor(version=7)  # the front door kept version 7 from a previous agent
    content = {"routes": [1]}
    pusher = TablePusher(door, lambda: dict(content), debounce=0.01)
    pusher.arm()
    task = asyncio.create_task(pusher.run())
    try:
        await wait_for(lambda: len(door.tables) == 1, timeout=5, what="push")
        assert door.tables[0] == {"version": 8, "routes": [1]}
        for i in range(20):  # a burst of reconciles
            content["routes"] = [i]
            pusher.changed()
        await wait_for(lambda: door.tables[-1]["routes"] == [19], timeout=5, what="push")
        assert len(door.tables) <= 3 and door.tables[-1]["version"] > 8
        before = len(door.tables)
        rounds = pusher.rounds
        pusher.changed()  # nothing changed: nothing sent
        await wait_for(lambda: pusher.rounds > rounds, timeout=5, what="a round")
        assert len(door.tables) == before
        door.down = True
        content["routes"] = ["while down"]
        pusher.changed()
        await wait_for(lambda: pusher._resend, timeout=5, what="push")
        door.down, door.version = False, 0  # restarted, with an older table
        pusher.resend()
        await wait_for(lambda: door.tables[-1]["routes"] == ["while down"], timeout=5, what="push")
        assert door.tables[-1]["version"] > door.tables[before - 1]["version"]
    finally:
        await cancel_and_wait(task)


async def test_nothing_is_pushed_before_the_controller_has_reconciled_every_service():
    door = FakeFrontDoor(version=3)
    pusher = TablePusher(door, lambda: {"routes": []}, debounce=0.0)
    task = asyncio.create_task(pusher.run())
    try:
        pusher.changed()
        pusher.resend()
        for _ in range(20):
            await asyncio.sleep(0)  # let the loop run: it must stay parked
        assert door.tables == [] and pusher.rounds == 0
        pusher.arm()
        await wait_for(lambda: door.tables, timeout=5, what="the first push")
        assert door.tables == [{"version": 4, "routes": []}]
    finally:
        await cancel_and_wait(task)
