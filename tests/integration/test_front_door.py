"""The front door process in front of the real llama-server (issue 21's data plane).

One llama-server with a single slot (so "the slot is busy" is observable on its
/slots) and long contexts (so a request can be kept running while the test looks),
a fresh front door per test in its own state dir.
"""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from metal_agent.core.front_door import parse_table
from metal_agent.frontdoor.access import Access
from metal_agent.frontdoor.server import FrontDoor
from tests.support.front_door import route, running_front_door, settle, start_front_door, table
from tests.support.llama import running_llama_server
from tests.support.ports import free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
#: ~15 s of generation on the tiny model: a request that is certainly still running when looked at.
LONG = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000, "ignore_eos": True, "stream": True}


def _argv(binary, model, port):
    return [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "8192", "--threads", "1", "--parallel", "1"]


@pytest.fixture(scope="module")
async def llama(llama_server_bin, tiny_model):
    port = free_port()
    async with running_llama_server(_argv(llama_server_bin, tiny_model, port), port=port) as server:
        yield server


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def _upstream(llama) -> str:
    return llama.base_url.removeprefix("http://")


async def _slot_busy(http, llama) -> bool:
    async with http.get(f"{llama.base_url}/slots") as resp:
        return any(slot.get("is_processing") for slot in await resp.json())


async def _wait_slot_idle(http, llama) -> None:
    await wait_for(lambda: _not(_slot_busy(http, llama)), timeout=10, what="llama-server's slot to be idle")


async def _not(awaitable) -> bool:
    return not await awaitable


async def _start_long_stream(http, url):
    """Open a long streaming completion and read its first event; the caller closes it."""
    resp = await http.post(url, json=LONG)
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    return resp


async def test_completions_on_the_route_port_and_the_client_port(tmp_path, llama, http):
    port, client_port = free_port(), free_port()
    async with running_front_door(tmp_path) as door:
        status, _ = await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama))], client_port=client_port))
        assert status == 204
        async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=SHORT) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] >= 1
        async with http.post(f"http://127.0.0.1:{client_port}{CHAT}", json={**SHORT, "model": "tiny"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"
        async with http.get(f"http://127.0.0.1:{client_port}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny"]
        async with http.post(f"http://127.0.0.1:{client_port}{CHAT}", json={**SHORT, "model": "nope"}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"
        metrics = await door.metrics()
        assert 'llmkube_metal_agent_front_door_requests_total{outcome="ok",service="ns/tiny"} 2.0' in metrics


async def test_streaming_passes_events_through_as_they_come(tmp_path, llama, http):
    port = free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama))]))
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "ignore_eos": True, "stream": True}
        async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [line async for line in resp.content if line.startswith(b"data: ")]
    assert events[-1].strip() == b"data: [DONE]"
    tokens = [json.loads(e[6:]) for e in events[:-1]]
    assert sum(1 for t in tokens if t["choices"][0]["delta"].get("content")) == 16


async def test_a_client_that_hangs_up_frees_the_engine_slot(tmp_path, llama, http):
    port = free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama), max_inflight=1)]))
        resp = await _start_long_stream(http, f"http://127.0.0.1:{port}{CHAT}")
        assert await _slot_busy(http, llama)
        assert (await door.route_state("ns/tiny"))["inflight"] == 1
        resp.close()  # hang up mid-stream
        await _wait_slot_idle(http, llama)
        await wait_for(lambda: _inflight_is(door, 0), timeout=10, what="the front door to free the slot")
        async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=SHORT) as again:
            assert again.status == 200
        assert 'outcome="client_gone",service="ns/tiny"} 1.0' in await door.metrics()


async def _inflight_is(door, n: int) -> bool:
    return (await door.route_state("ns/tiny")).get("inflight") == n


async def _queued_is(door, n: int) -> bool:
    return (await door.route_state("ns/tiny")).get("queued") == n


async def test_beyond_the_queue_is_429_with_retry_after_and_the_queue_drains(tmp_path, llama, http):
    port = free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama), max_inflight=1, queue=1)]))
        busy = await _start_long_stream(http, url)
        queued = asyncio.ensure_future(http.post(url, json=SHORT))
        await wait_for(lambda: _queued_is(door, 1), timeout=10, what="one request queued")
        async with http.post(url, json=SHORT) as over:
            assert over.status == 429
            assert int(over.headers["Retry-After"]) >= 1
            assert (await over.json())["error"]["code"] == "queue_full"
        busy.close()
        async with await asyncio.wait_for(queued, 20) as resp:
            assert resp.status == 200
        assert 'llmkube_metal_agent_front_door_requests_total{outcome="rejected",service="ns/tiny"} 1.0' in await door.metrics()


async def test_a_starting_route_holds_then_503s_with_retry_after(tmp_path, http):
    port = free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, None, state="starting", queue_timeout_s=0.3)]))
        async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=SHORT) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"]["code"] == "model_unavailable"


async def test_a_stopped_route_answers_503_at_once_instead_of_holding_the_client(tmp_path, http):
    port = free_port()
    async with running_front_door(tmp_path) as door:
        # A 20 s queue timeout: holding would keep the client for 20 s; the answer must come now.
        await door.put_table(table(1, [route("ns/tiny", port, None, state="stopped", queue_timeout_s=20)]))

        async def ask():
            async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=SHORT) as resp:
                return resp.status, resp.headers.get("Retry-After"), (await resp.json())["error"]["code"]

        assert await settle(ask(), timeout=5) == (503, "5", "model_not_running")


async def test_a_request_held_while_starting_is_released_by_the_table_with_an_upstream(tmp_path, llama, http):
    port = free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, None, state="starting")]))
        held = asyncio.ensure_future(http.post(url, json=SHORT))
        await wait_for(lambda: _queued_is(door, 1), timeout=10, what="the request to be held")
        await door.put_table(table(2, [route("ns/tiny", port, _upstream(llama))]))
        async with await asyncio.wait_for(held, 20) as resp:
            assert resp.status == 200


async def test_a_request_granted_a_slot_as_its_route_goes_back_to_holding_waits_for_the_next_engine(
        tmp_path, llama, http):
    """A held request is granted its slot by the table that gives the route an upstream, and the
    next table (a drain before a respawn: the route holds again) arrives before the request's task
    runs on. It must wait for the engine after that, not lose its connection: a client once saw
    `Server disconnected` under a steady load this way. The front door runs in this process so the
    two tables land in the same tick every time."""
    port = free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    door = FrontDoor(tmp_path, tmp_path / "front-door.sock", Access(None))

    def put(version: int, upstream: str | None) -> None:
        state = "serving" if upstream else "starting"
        door.proxy.apply(parse_table(table(version, [route("ns/tiny", port, upstream, state=state)])))

    await door.apply(parse_table(table(1, [route("ns/tiny", port, None, state="starting")])), persist=False)
    gate = door.proxy.gates["ns/tiny"]
    try:
        held = asyncio.ensure_future(http.post(url, json=SHORT))
        await wait_for(lambda: gate.queued == 1, timeout=10, what="the request to be held")
        put(2, _upstream(llama))  # its slot granted...
        assert gate.queued == 0 and gate.inflight == 1
        put(3, None)  # ...and the route holding again before it went upstream
        await wait_for(lambda: held.done() or gate.queued == 1, timeout=10, what="the request held again")
        assert not held.done() and gate.inflight == 0
        put(4, _upstream(llama))
        async with await asyncio.wait_for(held, 20) as resp:
            assert resp.status == 200
    finally:
        await door.shutdown()


async def test_a_refused_connect_on_a_serving_route_waits_for_the_next_upstream(tmp_path, llama, http):
    """A respawn: the table still names the old engine's port, which refuses; the request is
    held (not failed) until the table with the new engine arrives."""
    port, dead = free_port(), free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, f"127.0.0.1:{dead}")]))
        held = asyncio.ensure_future(http.post(url, json=SHORT))
        await wait_for(lambda: _connect_errors(door), timeout=10, what="a refused connect")
        assert not held.done()
        await door.put_table(table(2, [route("ns/tiny", port, _upstream(llama))]))
        async with await asyncio.wait_for(held, 20) as resp:
            assert resp.status == 200


async def _connect_errors(door) -> bool:
    return 'upstream_errors_total{kind="connect",service="ns/tiny"}' in await door.metrics()


async def test_a_bad_table_is_refused_whole_and_the_old_one_keeps_serving(tmp_path, llama, http):
    port, other = free_port(), free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama))]))
        bad = table(2, [route("ns/other", other, "127.0.0.1:1"), route("ns/tiny", port, "nowhere")])
        status, text = await door.put_table(bad)
        assert status == 400
        assert "ns/tiny" in text and "upstream" in text
        status, _ = await door.put_table("not a table")
        assert status == 400
        assert (await door.state())["version"] == 1
        async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=SHORT) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(f"http://127.0.0.1:{other}{CHAT}", json=SHORT):
                pass


async def test_a_restarted_front_door_serves_the_persisted_table(tmp_path, llama, http):
    port = free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(5, [route("ns/tiny", port, _upstream(llama))]))
    assert oct((tmp_path / "front-door-table.json").stat().st_mode & 0o777) == "0o600"
    async with running_front_door(tmp_path) as door:
        assert (await door.state())["version"] == 5
        assert oct(door.socket.stat().st_mode & 0o777) == "0o600"
        async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=SHORT) as resp:
            assert resp.status == 200


async def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path, llama, http):
    port = free_port()
    door = await start_front_door(tmp_path, grace=30)
    try:
        await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama))]))
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600, "ignore_eos": True, "stream": True}
        async with http.post(f"http://127.0.0.1:{port}{CHAT}", json=body) as resp:
            assert (await resp.content.readline()).startswith(b"data: ")
            door.process.signal(signal.SIGTERM)
            await wait_for(lambda: _refused(port), timeout=10, what="the listener to stop accepting")
            events = [line async for line in resp.content if line.startswith(b"data: ")]
        assert events[-1].strip() == b"data: [DONE]"
        assert await door.process.wait(timeout=20) == 0
    finally:
        await door.process.stop()


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_listeners_follow_the_routes_and_a_removed_route_answers_its_held_requests(tmp_path, llama, http):
    a, b = free_port(), free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", a, None, state="starting")]))
        held = asyncio.ensure_future(http.post(f"http://127.0.0.1:{a}{CHAT}", json=SHORT))
        await wait_for(lambda: _queued_is(door, 1), timeout=10, what="the request to be held")
        await door.put_table(table(2, [route("ns/other", b, _upstream(llama))]))
        async with await asyncio.wait_for(held, 10) as resp:
            assert resp.status == 503  # answered at once, not at its queue timeout
        assert await _refused(a)
        async with http.post(f"http://127.0.0.1:{b}{CHAT}", json=SHORT) as resp:
            assert resp.status == 200
        assert set((await door.state())["routes"]) == {"ns/other"}


async def test_an_engine_restarted_on_the_same_port_is_a_wait_not_an_error(tmp_path, llama_server_bin, tiny_model, http):
    """No table change at all: the pooled connections to the old process are dead, the port
    refuses for a while, and the back-off alone finds the new process."""
    engine, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    argv = _argv(llama_server_bin, tiny_model, engine)
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, f"127.0.0.1:{engine}")]))
        async with running_llama_server(argv, port=engine):
            async with http.post(url, json=SHORT) as resp:
                assert resp.status == 200  # leaves a pooled keep-alive connection behind
        held = asyncio.ensure_future(http.post(url, json=SHORT))
        await wait_for(lambda: _connect_errors(door), timeout=10, what="a refused connect")
        async with running_llama_server(argv, port=engine):
            async with await asyncio.wait_for(held, 20) as resp:
                assert resp.status == 200


async def test_a_client_that_hangs_up_while_queued_leaves_the_queue(tmp_path, http):
    port = free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, None, state="starting")]))
        held = asyncio.ensure_future(http.post(f"http://127.0.0.1:{port}{CHAT}", json=SHORT))
        await wait_for(lambda: _queued_is(door, 1), timeout=10, what="the request to be held")
        held.cancel()  # closes the client's connection
        await wait_for(lambda: _queued_is(door, 0), timeout=10, what="the queue to let go of it")
        assert 'outcome="client_gone",service="ns/tiny"} 1.0' in await door.metrics()


async def test_expect_100_continue_and_a_chunked_request_body(tmp_path, llama):
    port = free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama))]))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            body = json.dumps(SHORT).encode()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
            half = len(body) // 2
            for piece in (body[:half], body[half:]):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            answer = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
            assert answer["object"] == "chat.completion"
        finally:
            writer.close()


async def test_a_slow_reader_gets_the_whole_stream(tmp_path, llama, http):
    """Back-pressure: the client reads nothing until the engine has finished generating, so
    the front door's buffers fill and it must pause and resume reading from the engine."""
    import socket

    port = free_port()
    async with running_front_door(tmp_path) as door:
        await door.put_table(table(1, [route("ns/tiny", port, _upstream(llama))]))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        try:
            body = json.dumps({**LONG, "max_tokens": 4000}).encode()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await wait_for(lambda: _slot_busy(http, llama), timeout=10, what="generation to start")
            writer.transport.pause_reading()  # read nothing while the engine generates
            await wait_for(lambda: _not(_slot_busy(http, llama)), timeout=60, what="generation to end")
            writer.transport.resume_reading()
            events = 0
            while True:
                line = await asyncio.wait_for(reader.readline(), 20)
                if line.startswith(b"data: [DONE]"):
                    break
                if line.startswith(b"data: {") and b'"finish_reason":null' in line:
                    events += 1
            assert events >= 3900  # [DONE] reached; llama-server merges the pieces of a split UTF-8 character
        finally:
            writer.close()
