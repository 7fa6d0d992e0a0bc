"""The HTTP client side of `core.egress`: a session that connects only where the policy allows.

Two gates, both on addresses rather than on names, so that no spelling of a
host (a decimal IP, `localhost`, a name that resolves to 127.0.0.1, a DNS
answer that changes between two lookups) slips through:

* the resolver refuses a host name if *any* address it resolves to is not
  allowed (one clear error naming the host, before any connection);
* the socket factory refuses to create the socket for an address that is
  not allowed. aiohttp creates every socket through it, for IP literals
  (which skip the resolver) as well as names, so the address checked is
  exactly the address connected to.

Redirects are followed here, one hop at a time (`open_followed`), so each
hop is checked like the first and the token is put on a hop only when
`EgressPolicy.hop_carries_token` says so. The session never reads proxy
variables from the environment (`trust_env=False`): a proxy would make
the connected address meaningless.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import AsyncIterator

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from metal_agent.core.egress import REASON_ADDRESS, REASON_REDIRECT, EgressPolicy, next_hop

REDIRECTS = (301, 302, 303, 307, 308)
REASON_INVALID = "ModelSourceInvalid"


class AddressNotAllowed(OSError):
    """A connection the egress policy refuses; `why` says why, for the Model's status."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class PolicyResolver(AbstractResolver):
    """The default resolver, refusing a name when any of its addresses is not allowed."""

    def __init__(self, egress: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self.egress = egress
        self.inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            why = self.egress.address_refusal(result["host"])
            if why is not None:
                raise AddressNotAllowed(f"{host} resolves to an address downloads may not reach: {why}")
        return results

    async def close(self) -> None:
        await self.inner.close()


def socket_factory(egress: EgressPolicy):
    """aiohttp's socket factory: the last check, on the very address about to be connected."""

    def make(addr_info) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        why = egress.address_refusal(str(sockaddr[0]))
        if why is not None:
            raise AddressNotAllowed(why)
        return socket.socket(family=family, type=type_, proto=proto)

    return make


def session(egress: EgressPolicy, timeout: aiohttp.ClientTimeout,
            ssl_context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """A session for downloads under `egress` (call inside the running loop).

    auto_decompress off: byte counts, ranges and digests are about the file, not an encoding of it.
    """
    connector = aiohttp.TCPConnector(resolver=PolicyResolver(egress), socket_factory=socket_factory(egress),
                                     ssl=ssl_context if ssl_context is not None else True)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False, trust_env=False)


def refusal_of(err: BaseException) -> str | None:
    """The policy's reason if `err` is (or wraps) a refused connection."""
    if isinstance(err, AddressNotAllowed):
        return err.why
    os_error = getattr(err, "os_error", None)
    if isinstance(os_error, AddressNotAllowed):
        return os_error.why
    cause = err.__cause__
    return refusal_of(cause) if cause is not None and cause is not err else None


class Refused(Exception):
    """A hop the rules refuse: `reason` is a condition reason, `message` is safe to show."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@contextlib.asynccontextmanager
async def open_followed(http: aiohttp.ClientSession, url: str, headers: dict[str, str], token: str | None,
                        egress: EgressPolicy) -> AsyncIterator[tuple[aiohttp.ClientResponse, str]]:
    """GET `url`, following redirects by hand: (the final response, its URL).

    The token goes only on hops `egress.hop_carries_token` allows; every hop's
    address goes through the session's gates. Raises `Refused` for a redirect
    that is not followed or an address that is not allowed; aiohttp's errors
    otherwise.
    """
    current, hops = url, 0
    while True:
        hop_headers = dict(headers)
        if token and egress.hop_carries_token(url, current):
            hop_headers["Authorization"] = f"Bearer {token}"
        try:
            resp = await http.get(current, headers=hop_headers, allow_redirects=False)
        except aiohttp.InvalidURL:
            # e.g. a non-canonical IPv4 host ("2130706433"), refused by yarl before any lookup
            raise Refused(REASON_REDIRECT if hops else REASON_INVALID,
                          f"{'a redirect leads to' if hops else 'the source is'} a URL the HTTP client "
                          "refuses to parse") from None
        except aiohttp.ClientError as err:
            why = refusal_of(err)
            if why is not None:
                raise Refused(REASON_ADDRESS, why) from None
            raise
        if resp.status in REDIRECTS:
            target = next_hop(current, resp.headers.get("Location"), hops)
            resp.release()
            if isinstance(target, tuple):
                raise Refused(REASON_REDIRECT, f"not following {target[0]}")
            current, hops = target, hops + 1
            continue
        try:
            yield resp, current
        finally:
            resp.release()
        return
