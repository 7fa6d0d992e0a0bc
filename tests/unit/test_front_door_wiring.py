"""The agent's front-door parts with real sockets and processes: the publisher pointing slices at
stable ports, the agent socket's /review, the front door process spawned, adopted across an
agent restart and restarted when it dies, and its metrics appended. The front door here is
tests/support/front_door_stand_in.py (a unit test of the process supervision: the real one is exercised in tests/integration/test_front_door*.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest

from metal_agent.core.access import review_answer
from metal_agent.adapters.agent_socket import AgentSocket
from metal_agent.adapters.front_door_client import FrontDoorClient
from metal_agent.adapters.port_book_file import PortBookFile
from metal_agent.adapters.process.front_door_process import FrontDoorProcess
from metal_agent.app.front_door import MetricsAppender
from metal_agent.controller.front_door_table import TablePusher
from metal_agent.controller.publishing import HostAddress, Publisher
from metal_agent.controller.stable_ports import StablePorts
from metal_agent.core.backoff import Backoff
from metal_agent.tasks import cancel_and_wait
from tests.support.controller_fakes import FakeEvents, isvc
from tests.unit.test_controller_parts import KEY, FakeRegistrar, supervisor
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[2]


# -- publishing -----------------------------------------------------------------------------

class Registrar(FakeRegistrar):
    def __init__(self) -> None:
        super().__init__()
        self.removed: list[tuple[str, str]] = []

    async def remove(self, namespace: str, name: str) -> None:
        self.removed.append((namespace, name))


async def test_with_the_front_door_the_slice_points_at_the_stable_port_and_stays_ready(tmp_path):
    registrar = Registrar()
    ports = StablePorts(PortBookFile(tmp_path), host=lambda: "127.0.0.1")
    publisher = Publisher(registrar, HostAddress(bind="127.0.0.1", registered="10.0.0.5"), FakeEvents(), ports=ports)
    await publisher.register(KEY, isvc(), supervisor(port=40001, ready=True))
    await publisher.register(KEY, isvc(), supervisor(port=None, ready=False))  # respawning: no engine port yet
    first, second = registrar.ensured
    assert first.port == second.port == ports.port(KEY) and first.ready and second.ready
    assert first.address == "10.0.0.5"
    await publisher.mark_not_ready(KEY)  # before a respawn's stop: stays ready (nothing written)
    await publisher.unregister(KEY)  # gone for good: its port is released
    assert ports.port(KEY) is None and registrar.removed == [("ml", "chat")]


async def test_without_the_front_door_the_slice_follows_the_engine(tmp_path):
    registrar = FakeRegistrar()
    publisher = Publisher(registrar, HostAddress(bind="10.0.0.5", registered="10.0.0.5"), FakeEvents())
    await publisher.register(KEY, isvc(), supervisor(port=40001, ready=False))
    assert (registrar.ensured[0].port, registrar.ensured[0].ready) == (40001, False)


async def test_unpublished_services_still_get_a_stable_port_for_the_client_port(tmp_path):
    ports = StablePorts(PortBookFile(tmp_path), host=lambda: "127.0.0.1")
    publisher = Publisher(FakeRegistrar(), HostAddress(bind="127.0.0.1"), FakeEvents(), ports=ports)
    assert await publisher.register(KEY, isvc(), supervisor()) == (None, None)
    assert ports.port(KEY) is not None


# -- the agent socket -----------------------------------------------------------------------

async def review(path: Path, body) -> tuple[int, dict]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as s:
        async with s.post("http://agent/review", json=body) as resp:
            return resp.status, await resp.json()


async def test_the_agent_socket_is_private_and_reviews_through_the_reviewer_handed_in(tmp_path):
    asked = []

    async def reviewer(token, key, peer):
        asked.append((token, key, peer))
        if token == "boom":
            raise RuntimeError("the cluster went away")
        return review_answer(200 if token == "good" else 403, "ok" if token == "good" else "forbidden")

    sock = AgentSocket(tmp_path / "agent.sock", reviewer)
    await sock.start()
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "agent.sock").st_mode) == 0o600
        assert await review(sock.path, {"token": "good", "key": "ns/a", "peer": "10.0.0.7"}) == (
            200, {"allowed": True, "reason": "ok", "status": 200, "retry_after": 0.0})
        assert await review(sock.path, {"token": "bad", "key": "ns/a"}) == (
            200, {"allowed": False, "reason": "forbidden", "status": 403, "retry_after": 0.0})
        # A reviewer that fails is "ask again later" (503, never cached by the front door), not a crash.
        assert await review(sock.path, {"token": "boom", "key": "ns/a"}) == (
            200, {"allowed": False, "reason": "token review failed", "status": 503, "retry_after": 0.0})
        assert (await review(sock.path, {"token": 3}))[0] == 400
        assert (await review(sock.path, {"token": "t", "key": "ns/a", "peer": 7}))[0] == 400
        assert asked == [("good", "ns/a", "10.0.0.7"), ("bad", "ns/a", ""), ("boom", "ns/a", "")]
    finally:
        await sock.close()
    assert not sock.path.exists()


async def test_without_a_reviewer_every_token_is_refused(tmp_path):
    sock = AgentSocket(tmp_path / "agent.sock")
    await sock.start()
    try:
        assert await review(sock.path, {"token": "t", "key": "ns/a"}) == (
            200, {"allowed": False, "reason": "token review not configured", "status": 403, "retry_after": 0.0})
    finally:
        await sock.close()


async def test_the_agent_socket_never_replaces_a_file_that_is_not_its_socket(tmp_path):
    (tmp_path / "agent.sock").write_text("not a socket")
    with pytest.raises(OSError, match="not this user's socket"):
        await AgentSocket(tmp_path / "agent.sock").start()


# -- the process ----------------------------------------------------------------------------

def stand_in_process(state: Path, on_start) -> tuple[FrontDoorProcess, FrontDoorClient]:
    sock = state / "fd.sock"
    client = FrontDoorClient(sock, timeout=1.0)
    argv = (sys.executable, "-m", "tests.support.front_door_stand_in", "--socket", str(sock), "--state-dir", str(state))
    return FrontDoorProcess(argv, state_dir=state, log_path=state / "front-door.log", healthy=client.healthy,
                            on_start=on_start, backoff=Backoff(initial=0.05, factor=2.0, cap=0.2)), client


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # `-m tests.support...` resolves from here


async def test_spawned_then_adopted_by_the_next_agent_then_restarted_when_it_dies(tmp_path, in_repo):
    starts: list[str] = []
    first, client = stand_in_process(tmp_path, lambda: starts.append("first"))
    assert not first.adopt() and first.readiness() != True  # noqa: E712 - the reason is a string
    task = asyncio.create_task(first.run())
    pid = None
    try:
        await wait_for(lambda: first.up, timeout=20, what="the front door answers")
        pid = first.pid
        assert starts == ["first"] and first.readiness() is True
    finally:
        await cancel_and_wait(task)  # the agent exits: the front door serves on
    assert psutil.pid_exists(pid) and await client.healthy()

    second, _ = stand_in_process(tmp_path, lambda: starts.append("second"))
    assert second.adopt() and second.pid == pid  # the next agent re-attaches, starts no second one
    task = asyncio.create_task(second.run())
    try:
        await wait_for(lambda: second.up, timeout=20, what="the adopted front door answers")
        assert second.pid == pid and starts == ["first", "second"]
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: second.up and second.pid not in (None, pid), timeout=20, what="a new front door")
        assert second.restarts == 1 and starts == ["first", "second", "second"]
    finally:
        await cancel_and_wait(task)
        await second.stop()
    assert not (tmp_path / "front-door.json").exists()


async def test_a_forged_or_stale_record_is_not_adopted(tmp_path, in_repo):
    proc, _ = stand_in_process(tmp_path, lambda: None)
    (tmp_path / "front-door.json").write_text('{"pid": 1, "create_time": 0, "boot_time": 0, "argv": ["x"], '
                                              '"argv_digest": "nope"}')
    assert not proc.adopt()
    os.chmod(tmp_path / "front-door.json", 0o666)
    assert not proc.adopt()


async def test_the_record_is_written_before_the_exec_and_a_pid_less_one_is_adopted_by_command_line(
        tmp_path, in_repo):
    from metal_agent.adapters.process.front_door_process import read_record

    seen: list[object] = []
    first, client = stand_in_process(tmp_path, lambda: None)
    real_exec = asyncio.create_subprocess_exec

    async def exec_seeing_the_record(*argv, **kwargs):
        seen.append(read_record(tmp_path / "front-door.json"))  # what an agent killed now would leave
        return await real_exec(*argv, **kwargs)

    asyncio.create_subprocess_exec = exec_seeing_the_record
    try:
        await first._spawn()
    finally:
        asyncio.create_subprocess_exec = real_exec
    [pending] = seen
    assert pending is not None and pending.pid == 0 and pending.argv == first.argv
    pid = first.pid
    try:
        await wait_for(client.healthy, timeout=20, what="the stand-in answers")
        # An agent killed between the exec and the full record: the record still has no pid.
        from metal_agent.adapters.process.front_door_process import write_record

        write_record(tmp_path / "front-door.json", pending)
        second, _ = stand_in_process(tmp_path, lambda: None)
        assert second.adopt() and second.pid == pid  # found by its command line, not started twice
        assert read_record(tmp_path / "front-door.json").pid == pid  # and recorded in full now
    finally:
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                       timeout=10, what="the stand-in gone")
        if first.child is not None:
            await first.child.wait()
    # Nothing runs for a pid-less record: it is dropped, and a new front door would be started.
    write_record(tmp_path / "front-door.json", pending)
    third, _ = stand_in_process(tmp_path, lambda: None)
    assert not third.adopt() and not (tmp_path / "front-door.json").exists()


async def test_the_table_reaches_the_front_door_and_its_metrics_are_appended(tmp_path, in_repo):
    content = {"listen_host": "127.0.0.1", "client_port": 0, "routes": [{"key": "ns/a"}]}
    holder: list[TablePusher] = []
    proc, client = stand_in_process(tmp_path, lambda: holder[0].resend())
    pusher = TablePusher(client, lambda: dict(content), debounce=0.01)
    holder.append(pusher)
    pusher.arm()
    appender = MetricsAppender(client)
    assert await appender() == ""  # down: adds nothing
    tasks = [asyncio.create_task(proc.run()), asyncio.create_task(pusher.run())]
    try:
        await wait_for(lambda: pusher.pushed is not None, timeout=20, what="the table pushed")
        state = await client.state()
        assert state["version"] == pusher.version and "ns/a" in state["routes"]
        assert "stand_in_front_door_routes 1" in await appender()
    finally:
        await cancel_and_wait(*tasks)
        await proc.stop()


async def test_the_agents_metrics_carry_the_extra_text_in_the_classic_format_only():
    from prometheus_client import CollectorRegistry, Counter

    from metal_agent.adapters.http_server import create_app

    registry = CollectorRegistry()
    Counter("agent_thing", "a counter", registry=registry).inc()

    async def extra() -> str:
        return "front_door_thing 7\n"

    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(create_app(registry, extra_metrics=extra))) as http:
        text = await (await http.get("/metrics")).text()
        assert "agent_thing_total 1.0" in text and text.endswith("front_door_thing 7\n")
        open_metrics = await (await http.get("/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0"})).text()
        assert "front_door_thing" not in open_metrics and open_metrics.endswith("# EOF\n")


async def test_stop_all_stops_the_front_door_an_agent_left_serving(tmp_path, in_repo, capsys):
    from metal_agent.cli.stop_records import stop_front_door

    proc, client = stand_in_process(tmp_path, lambda: None)
    task = asyncio.create_task(proc.run())
    try:
        await wait_for(lambda: proc.up, timeout=20, what="the front door answers")
        pid = proc.pid
    finally:
        await cancel_and_wait(task)  # the agent exits: the front door serves on, as it should
    assert psutil.pid_exists(pid) and await client.healthy()

    assert await stop_front_door(tmp_path, grace=5)  # what `metal-agent stop-all` runs
    assert not await client.healthy() and not (tmp_path / "front-door.json").exists()
    assert f"front door: stopped pid {pid}" in capsys.readouterr().out
    assert await stop_front_door(tmp_path, grace=5)  # nothing recorded any more: nothing to do
