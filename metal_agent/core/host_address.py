"""Which of this Mac's addresses the cluster should use to reach its models.

A Mac has many addresses: loopback, link-local, Docker Desktop's and kind's
bridges, a VPN. The cluster can reach only some. Preference: a Tailscale
address (the usual way a cluster reaches a Mac on another network), then
the address of the interface that carries the default route, then any
other routable address.

What counts as Tailscale: an address `tailscale ip -4` reports, when the
CLI answered; otherwise an address in 100.64.0.0/10 *on Tailscale's own
interface* (``utunN`` on macOS, ``tailscale0`` on Linux: the prefixes
Tailscale's own interface code looks for). 100.64.0.0/10 alone proves
nothing: it is RFC 6598 shared address space, which CGNAT ISPs and LTE
routers hand to their customers' machines, so such an address on ``en0``
is an ordinary LAN address, chosen only if it carries the default route.

The address can change while the agent runs (Tailscale coming up after
login, DHCP, another Wi-Fi), so it is detected again on a timer;
`AddressTracker` decides when a new reading is a change worth acting on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

TAILSCALE = ipaddress.ip_network("100.64.0.0/10")
# Interface name prefixes of Tailscale's tunnel: macOS (utun, its network
# extension and tailscaled alike) and Linux/BSD (tailscale0).
TAILSCALE_INTERFACE_PREFIXES = ("utun", "tailscale")
# Docker's default bridge, the Kubernetes service range kind and Docker
# Desktop use, and Docker Desktop's VM network: never reachable from a cluster.
SKIPPED_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("172.17.0.0/16", "10.96.0.0/12", "192.168.65.0/24"))


@dataclass(frozen=True)
class Choice:
    address: str
    reason: str


class NoUsableAddress(ValueError):
    pass


def validate_host_ip(value: str, *, registered: bool = True) -> str:
    """An explicit --host-ip must be an IP literal; a registered one also routable unicast.

    Only a registered address is published in an EndpointSlice, where the
    cluster must be able to reach it. Without registration it is only where
    llama-server listens on this Mac, so any literal is the user's choice
    (loopback being the usual one).
    """
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"--host-ip {value!r} is not an IPv4 or IPv6 address") from None
    if registered and (ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast):
        raise ValueError(f"--host-ip {value} cannot be registered in an EndpointSlice (loopback, link-local, unspecified or multicast)")
    return str(ip)


def _usable(ip: ipaddress._BaseAddress) -> bool:
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return False
    return not any(ip in net for net in SKIPPED_NETWORKS if ip.version == net.version)


def is_tailscale_interface(name: str) -> bool:
    return name.startswith(TAILSCALE_INTERFACE_PREFIXES)


def choose_host_ip(addresses: list[tuple[str, str]], primary: str | None = None,
                   tailscale_ips: Collection[str] | None = None) -> Choice:
    """Pick from (interface, address) pairs; `primary` is the default route's source address.

    `tailscale_ips` is what `tailscale ip -4` printed, or None when there is
    no CLI or it did not answer. When given it is the only word on what is
    Tailscale (another VPN's utun may carry 100.64/10 too); an address it
    names counts only if an interface carries it, because the agent binds
    llama-server to it.
    """
    candidates = []
    for iface, raw in addresses:
        try:
            ip = ipaddress.ip_address(raw.split("%", 1)[0])
        except ValueError:
            continue
        if _usable(ip):
            candidates.append((iface, ip))
    if tailscale_ips is not None:
        reported = set(tailscale_ips)
        for iface, ip in candidates:
            if str(ip) in reported:
                return Choice(str(ip), f"Tailscale address on {iface} (tailscale ip -4)")
    else:
        for iface, ip in candidates:
            if ip.version == 4 and ip in TAILSCALE and is_tailscale_interface(iface):
                return Choice(str(ip), f"Tailscale address on {iface}")
    if primary is not None:
        for iface, ip in candidates:
            if str(ip) == primary:
                return Choice(str(ip), f"address of {iface}, which carries the default route")
    for iface, ip in sorted(candidates, key=lambda c: c[1].version):  # IPv4 first
        return Choice(str(ip), f"first routable address, on {iface}")
    raise NoUsableAddress("no routable address found on this machine; pass --host-ip")


@dataclass(frozen=True)
class AddressChange:
    """The address the cluster should use moved from `old` to `new`."""

    old: Choice
    new: Choice


class AddressTracker:
    """Decides when a fresh reading of the host address is a change worth acting on.

    Acting costs a re-registration and a respawn of every llama-server bound
    to the old address (a model reload), so a change must be real:

    - the same new address must be read `confirmations` times in a row
      (default 2): an interface mid-way through a Wi-Fi roam or a DHCP renew
      shows transient addresses, and one odd reading must not reload models;
    - no usable address at all (`None`: Wi-Fi down, cable out) is not a
      change: the old address stays published, the llama-servers keep their
      bind, and the first stable address afterwards decides;
    - a new reason for the same address (Tailscale came up on the address
      that already carried the default route) is not a change.
    """

    def __init__(self, current: Choice, confirmations: int = 2) -> None:
        if confirmations < 1:
            raise ValueError("confirmations must be at least 1")
        self.current = current
        self.confirmations = confirmations
        self._candidate: Choice | None = None
        self._seen = 0

    def observe(self, detected: Choice | None) -> AddressChange | None:
        if detected is None or detected.address == self.current.address:
            self._candidate, self._seen = None, 0
            return None
        if self._candidate is not None and self._candidate.address == detected.address:
            self._seen += 1
        else:
            self._seen = 1
        self._candidate = detected
        if self._seen < self.confirmations:
            return None
        change = AddressChange(self.current, detected)
        self.current, self._candidate, self._seen = detected, None, 0
        return change


def bind_address(address: str, bind_all: bool) -> str:
    """Where llama-server listens: only the registered address, or every interface with --bind-all."""
    if bind_all:
        return "::" if ":" in address else "0.0.0.0"
    return address
