"""Collect this machine's addresses (psutil) and the default route's source address."""

from __future__ import annotations

import socket

import psutil

from metal_agent.core.host_address import Choice, choose_host_ip

# A TEST-NET-1 address: connecting a UDP socket only asks the kernel for the
# route and source address; no packet is sent.
_ROUTE_PROBE = ("192.0.2.1", 9)


def _primary_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(_ROUTE_PROBE)
            return sock.getsockname()[0]
        except OSError:
            return None


def detect_host_ip() -> Choice:
    pairs = [
        (iface, addr.address)
        for iface, addrs in psutil.net_if_addrs().items()
        for addr in addrs
        if addr.family in (socket.AF_INET, socket.AF_INET6)
    ]
    return choose_host_ip(pairs, _primary_address())
