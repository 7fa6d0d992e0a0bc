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
from pathlib import Path
from typing import AsyncIterator, Sequence

TEST_NET = ipaddress.ip_network("198.18.0.0/15")
SOURCE_NET = ipaddress.ip_network("198.51.100.0/24")  # TEST-NET-2: extra client addresses (add_sources), apart from the pairs


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
    inner_if: str = ""
    outer_if: str = ""

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
        yield NetNS(name, inner_ip, outer_ip, inner_if, outer_if)
    finally:
        with contextlib.suppress(NetNSError):
            await _ip("link", "del", outer_if)
        await _ip("netns", "del", name)


async def move_address(ns: NetNS) -> NetNS:
    """The "Mac" changes networks: its address moves to a fresh /30 (the root side gets the
    peer address, so the new one is reachable) and the old one is gone. Returns the new view."""
    outer_ip, inner_ip = _random_pair()
    await _ip("addr", "add", f"{outer_ip}/30", "dev", ns.outer_if)
    await _ip("addr", "add", f"{inner_ip}/30", "dev", ns.inner_if, netns=ns.name)
    await _ip("addr", "del", f"{ns.inner_ip}/30", "dev", ns.inner_if, netns=ns.name)
    return NetNS(ns.name, inner_ip, outer_ip, ns.inner_if, ns.outer_if)


async def _address_in_use(address: str) -> bool:
    proc = await asyncio.create_subprocess_exec("ip", "-o", "addr", "show", "to", f"{address}/32",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return bool(out.strip())


async def add_sources(ns: NetNS, count: int) -> list[str]:
    """`count` more addresses in the root namespace that the "Mac" can answer: clients bound to
    them reach its address from a source of their own (as many machines would). Each is a /32
    on the root end of the veth pair with a route back to it inside the namespace; they go
    with the pair when the namespace is torn down."""
    taken = {ns.inner_ip, ns.outer_ip}
    sources: list[str] = []
    while len(sources) < count:
        address = str(SOURCE_NET.network_address + 1 + secrets.randbelow(SOURCE_NET.num_addresses - 2))
        if address in taken or await _address_in_use(address):
            continue
        taken.add(address)
        await _ip("addr", "add", f"{address}/32", "dev", ns.outer_if)
        await _ip("route", "add", f"{address}/32", "dev", ns.inner_if, netns=ns.name)
        sources.append(address)
    return sources


# -- sockets inside a namespace -------------------------------------------

CLONE_NEWNET = 0x40000000


def _in_netns(name: str, fn):
    """Run `fn` on a fresh thread that has joined the namespace (setns is per thread)."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    outcome: dict = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def forward_into(ns: NetNS, target_port: int, target_host: str = "127.0.0.1"):
    """Serve 127.0.0.1:<port> *inside* `ns`, forwarding to target_host:target_port in the root namespace.

    This is how an agent running in the namespace reaches the test API
    server, which listens on the root namespace's loopback only. Returns
    (asyncio server, port inside the namespace).
    """
    import socket

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        return sock

    listener = await asyncio.to_thread(_in_netns, ns.name, make)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, sock=listener)
    return server, listener.getsockname()[1]


async def kubeconfig_into(ns: NetNS, kubeconfig: Path, target: Path, api_port: int):
    """For an agent inside `ns`: forward to the API server listening on the root namespace's
    127.0.0.1:`api_port`, and write `target`, a copy of `kubeconfig` (same CA, same client
    certificate) whose server is that forward. Returns (forwarder to close, `target`)."""
    import yaml

    forwarder, inner_port = await forward_into(ns, api_port)
    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{inner_port}"
    target.write_text(yaml.safe_dump(config))
    return forwarder, target


async def http_get_in(ns: NetNS, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path> as seen *inside* `ns` (its loopback, not the root
    namespace's). Returns (status, body): what a local tool on "the Mac" does."""
    status, _, body = await http_request_in(ns, port, "GET", path, timeout=timeout)
    return status, body


async def http_request_in(ns: NetNS, port: int, method: str, path: str, headers: dict[str, str | None] | None = None,
                          body: bytes = b"", timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
    """Any request to 127.0.0.1:<port> *inside* `ns`, headers exactly as given: a plain HTTP/1.0
    request on a socket opened in the namespace. `Host` defaults to 127.0.0.1:<port>; a header
    given as None is left out. Returns (status, response headers lower-cased, body)."""
    import socket

    sent = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body:
        sent["Content-Length"] = str(len(body))
    head = "".join(f"{k}: {v}\r\n" for k, v in sent.items() if v is not None)
    request = f"{method} {path} HTTP/1.0\r\n{head}\r\n".encode() + body

    def fetch() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    raw = await asyncio.to_thread(_in_netns, ns.name, fetch)
    head_bytes, _, answer = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode(errors="replace").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP response from 127.0.0.1:{port} in {ns.name}: {lines[0]!r}") from None
    response_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, response_headers, answer.decode(errors="replace")
