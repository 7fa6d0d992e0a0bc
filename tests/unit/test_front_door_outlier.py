"""Passive health (frontdoor/outlier.py) against real sockets on loopback.

A "hung engine" here is a socket that listens and never accepts: exactly what a
SIGSTOPped llama-server looks like from outside (the kernel completes the handshake,
nothing answers). The integration test does the same to the real llama-server.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import CollectorRegistry, Counter

from metal_agent.core.front_door import Route, RouteState
from metal_agent.frontdoor import outlier as outlier_mod
from metal_agent.frontdoor.gate import Gate
from metal_agent.frontdoor.outlier import Outlier, probe
from metal_agent.frontdoor.upstream import Pool, Stalled
from tests.support.wait import wait_for


class Engine:
    """A real TCP server answering /health with `status` (None: hung, accepts nothing)."""

    def __init__(self, status: int | None = 200) -> None:
        self.status = status
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.server: asyncio.AbstractServer | None = None

    async def answer(self, status: int = 200) -> None:
        self.status = status

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {self.status} X\r\ncontent-length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, sock=self.sock)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.sock.close()


@pytest.fixture
async def engine():
    e = Engine()
    yield e
    e.close()


def _outlier(address) -> tuple[Outlier, Gate, Counter]:
    gate = Gate(Route("ns/a", "a", 1000, address, RouteState.SERVING, 1, 4, 5.0))
    counter = Counter("ejections", "test", registry=CollectorRegistry())
    return Outlier("ns/a", gate, counter), gate, counter


async def test_probe_true_on_200_false_on_500_hung_or_closed(engine):
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await probe(engine.address, timeout=0.2)  # hung: listening, never answering
    assert 0.15 <= loop.time() - started < 1.0
    await engine.answer(200)
    assert await probe(engine.address)
    engine.status = 500
    assert not await probe(engine.address)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert not await probe(("127.0.0.1", port))


async def test_a_failure_ejects_once_and_the_next_good_probe_brings_it_back(engine):
    outlier, gate, counter = _outlier(engine.address)
    outlier.failed(engine.address, "test")
    outlier.failed(engine.address, "again")  # already out: one ejection
    assert gate.ejected and gate.holds and counter._value.get() == 1
    waiter = asyncio.ensure_future(gate.acquire(asyncio.get_running_loop().time() + 5))
    await asyncio.sleep(0.2)  # hung engine: the recovery probes fail, the request stays held
    assert not waiter.done() and gate.queued == 1
    await engine.answer(200)
    await asyncio.wait_for(waiter, 3)
    assert not gate.ejected
    outlier.close()


async def test_a_new_engine_in_the_table_ends_an_ejection(engine):
    outlier, gate, _ = _outlier(engine.address)
    outlier.failed(engine.address, "test")
    gate.update(Route("ns/a", "a", 1000, ("127.0.0.1", 1), RouteState.SERVING, 1, 4, 5.0))
    assert not gate.ejected
    gate.update(gate.route)  # the same engine again: no news, stays in
    assert not gate.ejected
    outlier.failed(engine.address, "a late report about the old engine")
    assert not gate.ejected  # the route moved on: the new engine is not blamed
    outlier.close()


async def _connected(engine: Engine):
    up = await Pool().connect(engine.address)
    up.write(b"POST /v1/completions HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
    return up


async def test_a_request_waiting_on_a_hung_engine_is_given_up_and_the_engine_ejected(engine, monkeypatch):
    monkeypatch.setattr(outlier_mod, "STALL_S", 0.1)
    monkeypatch.setattr(outlier_mod, "PROBE_TIMEOUT_S", 0.2)
    outlier, gate, counter = _outlier(engine.address)
    up = await _connected(engine)
    loop = asyncio.get_running_loop()
    started = loop.time()
    handle = outlier.watch(up)
    with pytest.raises(Stalled):
        await asyncio.wait_for(up.read_head(), 5)
    handle.cancel()
    assert gate.ejected and counter._value.get() == 1
    assert loop.time() - started < 1.0  # STALL_S + the probe's timeout, not the request's
    outlier.close()


async def test_a_slow_answer_from_a_live_engine_is_left_alone(monkeypatch):
    monkeypatch.setattr(outlier_mod, "STALL_S", 0.05)
    release = asyncio.Event()

    async def serve(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"GET /health"):
            await release.wait()  # a long completion: no head for a while
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()
    try:
        outlier, gate, counter = _outlier(address)
        up = await Pool().connect(address)
        up.write(b"POST /v1/completions HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
        handle = outlier.watch(up)
        head = asyncio.ensure_future(up.read_head())
        await wait_for(lambda: _probed(outlier), timeout=3, what="a probe of the waiting engine")
        await asyncio.sleep(0.3)  # several stall periods: probes answer, nothing is given up
        assert not head.done() and not gate.ejected
        release.set()
        assert (await asyncio.wait_for(head, 3)).startswith(b"HTTP/1.1 200")
        handle.cancel()
        assert counter._value.get() == 0
        outlier.close()
        up.close()
    finally:
        server.close()


async def _probed(outlier: Outlier) -> bool:
    return outlier._check is not None and outlier._check.done()
