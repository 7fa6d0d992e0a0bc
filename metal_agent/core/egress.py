"""Where a model download may connect, and where a namespace's token may go. Pure rules, no I/O.

A Model's `spec.source` is written by whoever may edit Models in some
namespace, not by the Mac's owner, yet the agent fetches it from the Mac's
own network position. Two things follow, and both are allowlists:

* **Addresses.** A download connects only to publicly routable addresses,
  plus the networks the Mac's owner lists (`--download-allow-network`,
  e.g. the LAN of a NAS that serves models). Everything else is refused:
  the Mac itself (loopback: the agent's API, every llama-server), link-local
  (cloud metadata at 169.254.169.254, neighbours found by mDNS), private and
  shared ranges (the owner's router, printers, other machines), and forms
  that embed one of those (IPv4-mapped, NAT64, 6to4). The check is made on
  the address actually connected, after name resolution and at every
  redirect hop (the adapters call `address_refusal` from the resolver and
  from the socket factory), so DNS rebinding and redirects gain nothing.
  Unspecified, multicast and broadcast addresses are never allowed: no
  owner has a reason to download from one.

* **Tokens.** The bearer token from `spec.sourceSecretRef` goes only over
  https, only to a host the token is for (the Hugging Face endpoint the
  agent uses, or a host the owner lists with `--token-hosts`), and only to
  the origin the download started at: a redirect to another host, port or
  scheme drops it, as the Hugging Face client and browsers do (the hub's
  CDN URLs are signed and need no token).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Union
from urllib.parse import urljoin, urlsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MAX_REDIRECTS = 10  # the hub uses one or two; a loop or a maze ends here
ALLOW_NETWORK_FLAG = "--download-allow-network"
TOKEN_HOSTS_FLAG = "--token-hosts"

REASON_ADDRESS = "DownloadAddressNotAllowed"
REASON_REDIRECT = "DownloadRedirectRefused"
REASON_TOKEN_HOST = "TokenHostNotAllowed"

# Never a download address, whatever the owner lists.
_NEVER = (
    ipaddress.ip_network("0.0.0.0/8"),  # "this network": connecting to 0.x reaches this host on some systems
    ipaddress.ip_network("255.255.255.255/32"),
    ipaddress.ip_network("224.0.0.0/4"),
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("ff00::/8"),
)
# IPv6 forms that carry an IPv4 address a gateway would reach for us: judge the IPv4 one.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_6TO4 = ipaddress.ip_network("2002::/16")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_address(text: str) -> IPAddress | None:
    """An IP address as connected to: IPv6 zone ids dropped, IPv4-mapped IPv6 turned into IPv4."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _kind(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address (None if it is)."""
    if isinstance(address, ipaddress.IPv6Address):
        # NAT64 and 6to4 addresses reach the IPv4 address they carry: that one is judged.
        embedded = None
        if any(address in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        elif address in _6TO4:
            embedded = address.sixtofour
        if embedded is not None:
            inner = _kind(embedded)
            return None if inner is None else f"an IPv6 address that embeds {embedded}, {inner}"
        if address in _V4_COMPATIBLE and not (address.is_loopback or address.is_unspecified):
            return "an IPv4-compatible IPv6 address"
    if address.is_loopback:
        return "a loopback address (this Mac itself)"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services and local-only neighbours live)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if isinstance(address, ipaddress.IPv4Address) and address in ipaddress.ip_network("100.64.0.0/10"):
        return "a shared (carrier-grade NAT / Tailscale) address"
    if address.is_private:
        return "a private-network address"
    if not address.is_global or address.is_reserved:
        return "a reserved or special-purpose address"
    return None


@dataclass(frozen=True)
class EgressPolicy:
    """What the Mac's owner allows downloads to reach (the agent's flags; never a spec)."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    token_hosts: tuple[str, ...] = ()  # lower-case host names; "*.example.com" for its subdomains
    _never: tuple[IPNetwork, ...] = field(default=_NEVER, repr=False)

    def address_refusal(self, text: str) -> str | None:
        """None if a download may connect to the address `text`; else why not, for the user."""
        address = parse_address(text)
        if address is None:
            return f"{text!r} is not an IP address"
        if any(address in net for net in self._never if net.version == address.version):
            return f"{address} is never a download address"
        if any(address in net for net in self.allowed_networks if net.version == address.version):
            return None
        kind = _kind(address)
        if kind is None:
            return None
        return (f"{address} is {kind}; downloads reach only public addresses unless the Mac's owner "
                f"allows a network with {ALLOW_NETWORK_FLAG}")

    def token_host_allowed(self, host: str) -> bool:
        host = normalize_host(host)
        for allowed in self.token_hosts:
            if allowed.startswith("*."):
                if host.endswith(allowed[1:]):
                    return True
            elif host == allowed:
                return True
        return False

    def token_refusal(self, url: str) -> str | None:
        """None if the token of `spec.sourceSecretRef` may be sent to `url`; else why not."""
        parts = urlsplit(url)
        if parts.scheme != "https":
            return (f"{parts.scheme}:// would carry the token in clear text; a token is sent only over https")
        host = normalize_host(parts.hostname or "")
        if not self.token_host_allowed(host):
            listed = ", ".join(self.token_hosts) or "none"
            return (f"the token is sent only to the Hugging Face endpoint and hosts the Mac's owner lists with "
                    f"{TOKEN_HOSTS_FLAG} ({listed}), not to {host or 'an empty host'}")
        return None

    def hop_carries_token(self, first_url: str, hop_url: str) -> bool:
        """The token goes on this hop: it is allowed at all, and the hop is still the origin the
        download started at (a redirect elsewhere, even to another allowed host, drops it)."""
        return self.token_refusal(first_url) is None and same_origin(first_url, hop_url)


def normalize_host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        port = -1
    return parts.scheme, normalize_host(parts.hostname or ""), port


def same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b)


def next_hop(current: str, location: str | None, hops: int) -> str | tuple[str]:
    """The URL a redirect leads to, or (why it is not followed,)."""
    if not location:
        return ("a redirect without a Location",)
    if hops >= MAX_REDIRECTS:
        return (f"more than {MAX_REDIRECTS} redirects",)
    target = urljoin(current, location.strip())
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https"):
        return (f"a redirect to a {parts.scheme or 'relative'}: URL; downloads use http(s) only",)
    if not parts.hostname:
        return ("a redirect to a URL without a host",)
    return target


# -- the owner's flags -----------------------------------------------------------------


def _items(values: Iterable[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """`--download-allow-network` values: CIDRs or single addresses, repeated or comma-separated."""
    networks = []
    for item in _items(values):
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a network (CIDR such as 192.168.1.0/24, or an address)") from None
        if net.prefixlen == 0:
            raise ValueError(f"{item!r} would allow every address; list the networks models come from")
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
            raise ValueError(f"{item!r}: write IPv4 networks in IPv4 form")
        networks.append(net)
    return tuple(networks)


def parse_token_hosts(values: Iterable[str]) -> tuple[str, ...]:
    """`--token-hosts` values: host names (or `*.domain` for its subdomains) or IP addresses."""
    hosts = []
    for item in _items(values):
        host = normalize_host(item)
        name = host[2:] if host.startswith("*.") else host
        if parse_address(name) is not None and not host.startswith("*."):
            hosts.append(str(parse_address(name)))
            continue
        labels = name.split(".")
        if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels) or (
                host.startswith("*.") and len(labels) < 2):
            raise ValueError(f"{item!r} is not a host name (e.g. models.example.com or *.example.com)")
        hosts.append(host)
    return tuple(dict.fromkeys(hosts))


def policy(allow_networks: Iterable[str] = (), token_hosts: Iterable[str] = (),
           hub_endpoint: str | None = None) -> EgressPolicy:
    """The policy from the owner's flags; the hub endpoint's host always takes the hub's tokens."""
    hosts = list(parse_token_hosts(token_hosts))
    if hub_endpoint:
        hub_host = normalize_host(urlsplit(hub_endpoint).hostname or "")
        if hub_host and hub_host not in hosts:
            hosts.insert(0, hub_host)
    return EgressPolicy(parse_networks(allow_networks), tuple(hosts))
