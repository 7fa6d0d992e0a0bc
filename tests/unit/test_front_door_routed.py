"""A new service's slice behind the front door says ready only once the front door has been handed
its route (PUT /table returns after the port is bound). Before this, the slice pointed cluster
clients at the stable port tens of milliseconds before anything listened there (they were refused:
~280 refused connections in the first ~75 ms of tests/integration/test_front_door_load.py's load)."""

from __future__ import annotations

from metal_agent.adapters.front_door_client import FrontDoorUnavailable
from metal_agent.adapters.port_book_file import PortBookFile
from metal_agent.app.front_door import FrontDoorParts
from metal_agent.controller.front_door_table import TablePusher
from metal_agent.controller.publishing import ROUTE_WAIT_S, HostAddress, Publisher
from metal_agent.controller.stable_ports import StablePorts
from tests.support.controller_fakes import FakeEvents, isvc
from tests.unit.test_controller_parts import KEY, FakeRegistrar, supervisor


async def test_the_slice_waits_for_the_route_and_looks_again_soon(tmp_path):
    registrar = FakeRegistrar()
    handed = [False]

    async def routed(key: str) -> bool:
        return handed[0]

    ports = StablePorts(PortBookFile(tmp_path), host=lambda: "127.0.0.1")
    publisher = Publisher(registrar, HostAddress(bind="127.0.0.1", registered="10.0.0.5"), FakeEvents(),
                          ports=ports, routed=routed)
    assert await publisher.register(KEY, isvc(), supervisor()) == (None, ROUTE_WAIT_S)
    handed[0] = True
    assert await publisher.register(KEY, isvc(), supervisor()) == (None, None)
    first, second = registrar.ensured
    assert (first.ready, second.ready) == (False, True) and first.port == second.port == ports.port(KEY)


class ControlSocket:
    """Stands in for the front door's control socket: the routes its GET /state reports."""

    def __init__(self, routes: dict | None) -> None:
        self.routes = routes

    async def state(self) -> dict:
        if self.routes is None:
            raise FrontDoorUnavailable("GET /state: connection refused")
        return {"version": 1, "routes": self.routes}


def _parts(pusher: TablePusher, socket: ControlSocket) -> FrontDoorParts:
    return FrontDoorParts(ports=None, client=socket, pusher=pusher, process=None, socket=None, access=None, drain=None,
                          rebind=None, on_demand=None)


async def test_routed_reads_the_last_table_the_front_door_accepted_and_asks_for_a_push():
    socket = ControlSocket({})
    pusher = TablePusher(client=socket, compute=dict)
    parts = _parts(pusher, socket)
    pusher.pushed = {"version": 3, "routes": [{"key": "ml/other", "port": 31000}]}
    assert not await parts.routed(KEY) and pusher._dirty.is_set()  # not yet: and a push is asked for
    pusher.pushed = {"version": 4, "routes": [{"key": "ml/other"}, {"key": KEY, "state": "starting"}]}
    assert await parts.routed(KEY)  # handed, in any state: its port is bound


async def test_before_the_first_push_the_front_door_is_asked_what_it_serves():
    socket = ControlSocket(None)  # just spawned, not up yet
    parts = _parts(TablePusher(client=socket, compute=dict), socket)
    assert not await parts.routed(KEY)
    socket.routes = {"ml/other": {"inflight": 0}}  # up, serving a table without it
    assert not await parts.routed(KEY)
    socket.routes[KEY] = {"inflight": 0}  # an adopted front door serving its persisted table
    assert await parts.routed(KEY)
