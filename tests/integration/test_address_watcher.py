"""The host address, detected on real interfaces, and re-detected when they change.

A network namespace stands in for the Mac: its veth carries the LAN address
and the default route; a second interface named like Tailscale's macOS
tunnel (`utun7`) comes and goes with a 100.64/10 address, as Tailscale does
after login. `psutil.net_if_addrs()` and the route probe run inside the
namespace (a thread that joined it), so every reading is the kernel's.
"""

from __future__ import annotations

import asyncio

import pytest

from metal_agent.adapters.host_address import AddressWatcher, detect_host_ip
from metal_agent.core.host_address import AddressChange, Choice
from tests.support import netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2"),
]

TAILSCALE_ADDRESS = "100.101.102.103"


def inner_interface(ns: netns.NetNS) -> str:
    return f"ma{ns.name.removeprefix('ma-')}i"  # tests.support.netns names the namespace's veth end so


def detector(ns: netns.NetNS):
    """detect_host_ip() as the agent runs it, but inside `ns` and without asking a tailscale CLI."""
    return lambda: netns._in_netns(ns.name, lambda: detect_host_ip(tailscale_cli=None))


async def ip(ns: netns.NetNS, *args: str) -> None:
    await netns._ip(*args, netns=ns.name)


async def test_watcher_follows_tailscale_coming_and_going():
    async with netns.network_namespace() as ns:
        lan = inner_interface(ns)
        await ip(ns, "route", "add", "default", "via", ns.outer_ip)
        detect = detector(ns)
        start = await asyncio.to_thread(detect)
        assert start == Choice(ns.inner_ip, f"address of {lan}, which carries the default route")

        changes: asyncio.Queue[AddressChange] = asyncio.Queue()
        watcher = AddressWatcher(start, changes.put_nowait, interval=0.05, detect=detect)
        watcher.start()
        try:
            # Tailscale comes up after login: its utun gets the tailnet address.
            await ip(ns, "link", "add", "utun7", "type", "veth", "peer", "name", "tsp7")
            await ip(ns, "addr", "add", f"{TAILSCALE_ADDRESS}/32", "dev", "utun7")
            await ip(ns, "link", "set", "utun7", "up")
            change = await asyncio.wait_for(changes.get(), 30)
            assert change == AddressChange(start, Choice(TAILSCALE_ADDRESS, "Tailscale address on utun7"))
            assert watcher.current.address == TAILSCALE_ADDRESS

            # Tailscale goes away (logout, quit): back to the default route's address.
            await ip(ns, "link", "del", "utun7")
            change = await asyncio.wait_for(changes.get(), 30)
            assert change.old.address == TAILSCALE_ADDRESS and change.new == start
            assert changes.empty()
        finally:
            await watcher.stop()


async def test_cgnat_address_on_the_lan_interface_is_not_taken_for_tailscale():
    """An ISP's 100.64/10 address on the LAN interface, carrying the default route."""
    async with netns.network_namespace() as ns:
        lan = inner_interface(ns)
        await ip(ns, "addr", "add", "100.72.0.10/24", "dev", lan)
        await ip(ns, "route", "add", "default", "via", "100.72.0.1", "dev", lan)
        choice = await asyncio.to_thread(detector(ns))
        assert choice == Choice("100.72.0.10", f"address of {lan}, which carries the default route")

        # Tailscale's own interface still wins once it is there.
        await ip(ns, "link", "add", "utun7", "type", "veth", "peer", "name", "tsp7")
        await ip(ns, "addr", "add", f"{TAILSCALE_ADDRESS}/32", "dev", "utun7")
        await ip(ns, "link", "set", "utun7", "up")
        assert (await asyncio.to_thread(detector(ns))).address == TAILSCALE_ADDRESS


async def test_address_move_on_the_lan_is_a_change():
    """DHCP hands out another address (or another Wi-Fi): the watcher reports the new one."""
    async with netns.network_namespace() as ns:
        lan = inner_interface(ns)
        await ip(ns, "addr", "add", "198.19.7.5/24", "dev", lan)
        await ip(ns, "route", "add", "default", "via", "198.19.7.1", "dev", lan, "src", "198.19.7.5")
        detect = detector(ns)
        start = await asyncio.to_thread(detect)
        assert start.address == "198.19.7.5"
        watcher = AddressWatcher(start, lambda change: None, detect=detect)
        await ip(ns, "route", "replace", "default", "via", "198.19.7.1", "dev", lan, "src", ns.inner_ip)
        await ip(ns, "addr", "del", "198.19.7.5/24", "dev", lan)
        assert await watcher.check() is None  # one reading is not enough
        change = await watcher.check()
        assert change is not None and change.new.address == ns.inner_ip
