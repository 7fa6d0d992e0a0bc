"""The network-namespace helper gives a reachable, non-loopback test host."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tests.support import netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2"),
]

SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
conn, peer = s.accept()
conn.sendall(f"hello {peer[0]}".encode())
conn.close()
"""


async def test_server_in_namespace_is_reached_at_its_address():
    async with netns.network_namespace() as ns:
        proc = await asyncio.create_subprocess_exec(
            *ns.wrap([sys.executable, "-c", SERVER, ns.inner_ip]), stdout=asyncio.subprocess.PIPE
        )
        try:
            port = int((await asyncio.wait_for(proc.stdout.readline(), 10)).strip())
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ns.inner_ip, port), 5)
            greeting = (await asyncio.wait_for(reader.read(), 5)).decode()
            writer.close()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert greeting == f"hello {ns.outer_ip}"  # came from the root namespace's end of the veth


async def test_namespace_is_removed_on_exit():
    async with netns.network_namespace() as ns:
        name = ns.name
    proc = await asyncio.create_subprocess_exec("ip", "netns", "list", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert name not in out.decode()
