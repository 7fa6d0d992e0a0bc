"""The front door's attacks, request by request, through the real front door process in front of
the real llama-server (issue 21, item 2).

The front door listens on this machine's own non-loopback address, so a request from here
arrives from an address that is not loopback: the position of a stranger on the Mac's LAN.
Each attack asserts the refusal (status, OpenAI-shaped body, no credential echoed) and that
the engine saw nothing (its request counter does not move).
"""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
import psutil
import pytest

from metal_agent.core.access import key_digest
from tests.support.front_door import route, running_front_door, table
from tests.support.llama import running_llama_server
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
KEY_A = "key-of-service-a-0123456789abcdef"
KEY_B = "key-of-service-b-0123456789abcdef"


def lan_address() -> str:
    """An IPv4 address of this machine that is not loopback (every CI machine has one)."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    raise AssertionError("this machine has no non-loopback IPv4 address to play the LAN")


@pytest.fixture(scope="module")
async def llama(llama_server_bin, tiny_model):
    port = free_port()
    argv = [str(llama_server_bin), "--model", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "512", "--threads", "1", "--parallel", "1", "--metrics"]
    async with running_llama_server(argv, port=port) as server:
        yield server


async def engine_requests(http: aiohttp.ClientSession, llama) -> float:
    async with http.get(f"{llama.base_url}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("llamacpp:requests_processing") or line.startswith("llamacpp:n_decode_total"))


def routes(llama, port_a: int, port_b: int) -> list[dict]:
    upstream = llama.base_url.removeprefix("http://")
    a, b = route("ns/a", port_a, upstream), route("ns/b", port_b, upstream)
    a["access"], b["access"] = {"digests": [key_digest(KEY_A)]}, {"digests": [key_digest(KEY_B)]}
    return [a, b]


async def post(http, url: str, token: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.post(url, json=SHORT, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def test_a_stranger_on_the_lan_and_a_key_of_another_service_are_refused_before_the_engine(tmp_path, llama):
    host, port_a, port_b = lan_address(), free_port(), free_port()
    async with running_front_door(tmp_path) as door, aiohttp.ClientSession() as http:
        status, text = await door.put_table({**table(1, routes(llama, port_a, port_b), listen_host=host),
                                             "access": {"mode": "cluster", "networks": []}})
        assert status == 204, text
        url_a = f"http://{host}:{port_a}{CHAT}"
        before = await engine_requests(http, llama)

        status, headers, body = await post(http, url_a)  # no credential at all
        assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert set(body["error"]) == {"message", "type", "code"}
        status, _, body = await post(http, url_a, KEY_B)  # another service's key
        assert status in (401, 403) and KEY_B not in str(body)
        status, _, body = await post(http, url_a, "a" * 40)  # a guess
        assert status in (401, 403) and "a" * 40 not in str(body)
        forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."  # an unsigned "token" (alg none)
        status, _, body = await post(http, url_a, forged)
        assert status in (401, 403) and forged not in str(body)
        assert await engine_requests(http, llama) == before  # none of them reached the engine

        status, _, _ = await post(http, url_a, KEY_A)  # the service's own key
        assert status == 200
        assert await engine_requests(http, llama) > before  # the counter does see what reaches the engine
        assert (await post(http, f"http://{host}:{port_b}{CHAT}", KEY_B))[0] == 200


async def test_a_network_the_owner_lists_and_open_mode_let_callers_in_without_a_credential(tmp_path, llama):
    host, port_a, port_b = lan_address(), free_port(), free_port()
    async with running_front_door(tmp_path) as door, aiohttp.ClientSession() as http:
        url_a = f"http://{host}:{port_a}{CHAT}"
        assert (await door.put_table({**table(1, routes(llama, port_a, port_b), listen_host=host),
                                      "access": {"mode": "cluster", "networks": [f"{host}/32"]}}))[0] == 204
        assert (await post(http, url_a))[0] == 200
        assert (await door.put_table({**table(2, routes(llama, port_a, port_b), listen_host=host),
                                      "access": {"mode": "open", "networks": []}}))[0] == 204
        assert (await post(http, url_a))[0] == 200
