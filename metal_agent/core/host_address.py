"""Which of this Mac's addresses the cluster should use to reach its models.

A Mac has many addresses: loopback, link-local, Docker Desktop's and kind's
bridges, a VPN. The cluster can reach only some. Preference: a Tailscale
address (100.64.0.0/10, the usual way a cluster reaches a Mac on another
network), then the address of the interface that carries the default route,
then any other routable address. The choice and its reason are logged once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

TAILSCALE = ipaddress.ip_network("100.64.0.0/10")
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


def choose_host_ip(addresses: list[tuple[str, str]], primary: str | None = None) -> Choice:
    """Pick from (interface, address) pairs; `primary` is the default route's source address."""
    candidates = []
    for iface, raw in addresses:
        try:
            ip = ipaddress.ip_address(raw.split("%", 1)[0])
        except ValueError:
            continue
        if _usable(ip):
            candidates.append((iface, ip))
    for iface, ip in candidates:
        if ip.version == 4 and ip in TAILSCALE:
            return Choice(str(ip), f"Tailscale address on {iface}")
    if primary is not None:
        for iface, ip in candidates:
            if str(ip) == primary:
                return Choice(str(ip), f"address of {iface}, which carries the default route")
    for iface, ip in sorted(candidates, key=lambda c: c[1].version):  # IPv4 first
        return Choice(str(ip), f"first routable address, on {iface}")
    raise NoUsableAddress("no routable address found on this machine; pass --host-ip")
