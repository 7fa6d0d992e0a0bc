"""Network namespaces that stand in for "the Mac" in registration tests.

Kubernetes refuses loopback addresses in EndpointSlices, so to test that a
client really reaches llama-server at the address the agent registers, the
agent and its llama-server run inside a network namespace joined to the root
namespace by a veth pair. Addresses come from 198.18.0.0/15 (RFC 2544,
reserved for benchmarking), so test traffic never aims at a real network.

Needs root and iproute2; `available()` tells the tests whether to skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

TEST_NET = ipaddress.ip_network("198.18.0.0/15")


class NetNSError(RuntimeError):
    pass


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


async def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *( ("netns", "exec", netns, "ip") if netns else () ), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise NetNSError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")


@dataclass(frozen=True)
class NetNS:
    name: str
    inner_ip: str  # the namespace's ("the Mac's") address
    outer_ip: str  # the root namespace's end of the veth pair

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """argv that runs `argv` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def _random_pair() -> tuple[str, str]:
    block = secrets.randbelow(TEST_NET.num_addresses // 4)
    base = TEST_NET.network_address + block * 4
    return str(base + 1), str(base + 2)


@contextlib.asynccontextmanager
async def network_namespace() -> AsyncIterator[NetNS]:
    """Create a namespace + veth pair on a random /30; always torn down."""
    tag = secrets.token_hex(3)
    name, outer_if, inner_if = f"ma-{tag}", f"ma{tag}o", f"ma{tag}i"
    outer_ip, inner_ip = _random_pair()
    await _ip("netns", "add", name)
    try:
        await _ip("link", "add", outer_if, "type", "veth", "peer", "name", inner_if)
        await _ip("link", "set", inner_if, "netns", name)
        await _ip("addr", "add", f"{outer_ip}/30", "dev", outer_if)
        await _ip("link", "set", outer_if, "up")
        await _ip("addr", "add", f"{inner_ip}/30", "dev", inner_if, netns=name)
        await _ip("link", "set", inner_if, "up", netns=name)
        await _ip("link", "set", "lo", "up", netns=name)
        yield NetNS(name, inner_ip, outer_ip)
    finally:
        with contextlib.suppress(NetNSError):
            await _ip("link", "del", outer_if)
        await _ip("netns", "del", name)
