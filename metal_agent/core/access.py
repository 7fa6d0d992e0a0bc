"""Who may call a model through the front door: the decision for one request, from facts alone.

A llama-server on the Mac's address answers anyone who can route to it (the
LAN, Wi-Fi guests, VPN peers); cluster-side controls never see that traffic.
So the front door asks `decide` before it queues a request, in this order:

1. `open` mode (the Go agent's behaviour, an explicit choice of the Mac's
   owner): everyone.
2. A loopback peer: already on the Mac, where the engine's port is a `lsof`
   away anyway.
3. A peer inside a listed network: the cluster's Node addresses and pod CIDRs
   (read from the API by the agent, kept current) and the CIDRs the owner adds.
4. `Authorization: Bearer <key>` whose sha256 is one of the service's API-key
   digests (compared in constant time, against every digest): allowed without
   asking anyone. Only digests ever reach the front door.
5. A bearer that looks like a JWT: `Review`, the agent asks the cluster
   (TokenReview, then SubjectAccessReview on `inferenceservices/proxy`).
6. Anything else: 401 when no usable credential came, 403 when one came and is
   refused. Bodies are OpenAI-shaped; no message ever contains the credential.

IPv4-mapped IPv6 peers (`::ffff:10.1.2.3`, a dual-stack listener's view of an
IPv4 client) are judged as the IPv4 address they are. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum

from metal_agent.core import openai_errors
from metal_agent.core.egress import parse_address
from metal_agent.core.metrics_auth import review_about
from metal_agent.core.review_limits import GLOBAL_RATE, PER_SOURCE_RATE


class AccessMode(StrEnum):
    CLUSTER = "cluster"
    OPEN = "open"


# Bounds on what a stranger may make one decision cost. A ServiceAccount token is about 1 KiB and an
# OIDC one a few; aiohttp refuses header lines over 8 KiB before we ever see them.
MAX_CREDENTIAL = 16 * 1024
MAX_KEYS = 256  # digests per service: rotation needs two, a team a handful
MAX_NETWORKS = 65536  # entries in a policy (a 5,000-Node cluster lists ~10,000)

_DIGEST = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_SPACE = re.compile(r"\s")


@dataclass(frozen=True)
class Allow:
    how: str  # "open" | "loopback" | "network" | "api-key" | "token"


@dataclass(frozen=True)
class Review:
    token: str


@dataclass(frozen=True)
class Refuse:
    status: int
    code: str
    message: str


_NO_CREDENTIAL = Refuse(
    401, "missing_credentials",
    "this model is served to its cluster only: send `Authorization: Bearer <key>` with an API key of this "
    "service or a Kubernetes ServiceAccount token allowed to use it")
_NOT_BEARER = Refuse(
    401, "unsupported_authorization",
    "only `Authorization: Bearer <key>` is accepted (an API key of this service or a ServiceAccount token)")
_REFUSED = Refuse(
    403, "invalid_api_key",
    "the bearer credential is neither an API key of this service nor a Kubernetes token")
_TOO_LONG = Refuse(403, "invalid_api_key", "the bearer credential is too long to be an API key or a token")


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (or a bare address: one host), host bits dropped; an IPv4-mapped IPv6 network as IPv4."""
    if not isinstance(text, str):
        raise ValueError(f"a network must be a CIDR string, not {type(text).__name__}")
    net = ipaddress.ip_network(text.strip(), strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net


class _NetworkIndex:
    """Peer-in-any-network in O(distinct prefix lengths), not O(networks): one set of network
    numbers per prefix length. A cluster of thousands of Nodes lists thousands of /32s and /24s."""

    def __init__(self, networks) -> None:
        self._v4: dict[int, set[int]] = {}
        self._v6: dict[int, set[int]] = {}
        for net in networks:
            table, bits = (self._v4, 32) if net.version == 4 else (self._v6, 128)
            table.setdefault(net.prefixlen, set()).add(int(net.network_address) >> (bits - net.prefixlen))

    def __contains__(self, ip) -> bool:
        table, bits = (self._v4, 32) if ip.version == 4 else (self._v6, 128)
        number = int(ip)
        return any((number >> (bits - length)) in numbers for length, numbers in table.items())


@dataclass(frozen=True)
class AccessPolicy:
    mode: AccessMode
    networks: tuple[str, ...] = ()  # CIDRs allowed with no credential (normalised: `10.0.0.0/8`)
    _index: _NetworkIndex = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        mode = AccessMode(self.mode)  # ValueError names the bad mode
        if len(self.networks) > MAX_NETWORKS:
            raise ValueError(f"an access policy lists at most {MAX_NETWORKS} networks, not {len(self.networks)}")
        parsed = sorted({_network(n) for n in self.networks}, key=lambda n: (n.version, n.network_address, n.prefixlen))
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "networks", tuple(str(n) for n in parsed))
        object.__setattr__(self, "_index", _NetworkIndex(parsed))

    def allows_peer(self, peer: str | None) -> bool:
        ip = parse_address(peer) if peer else None
        return ip is not None and ip in self._index

    def to_json(self) -> dict:
        return {"mode": self.mode.value, "networks": list(self.networks)}

    @classmethod
    def from_json(cls, data: object) -> "AccessPolicy":
        if not isinstance(data, dict):
            raise ValueError("an access policy is a JSON object")
        networks = data.get("networks", [])
        if not isinstance(networks, list):
            raise ValueError("access policy: `networks` must be a list of CIDRs")
        # No mode said (an agent that pushed no policy): the safe one, not the open one.
        return cls(AccessMode(data.get("mode", AccessMode.CLUSTER.value)), tuple(networks))


@dataclass(frozen=True)
class ServiceKeys:
    digests: tuple[str, ...] = ()  # sha256 hex of the service's API keys (lowercase)

    def __post_init__(self) -> None:
        if len(self.digests) > MAX_KEYS:
            raise ValueError(f"a service has at most {MAX_KEYS} API keys, not {len(self.digests)}")
        normal = []
        for digest in self.digests:
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest.lower()):
                raise ValueError("an API-key digest is 64 hex digits (sha256)")  # never echoed: it is a secret's hash
            normal.append(digest.lower())
        object.__setattr__(self, "digests", tuple(sorted(set(normal))))

    @classmethod
    def of(cls, keys) -> "ServiceKeys":
        """The digests of these keys (the agent's side: keys never leave it)."""
        return cls(tuple(key_digest(k) for k in keys))

    def matches(self, credential: str) -> bool:
        """Whether `credential` is one of the keys: every digest compared, in constant time each, so the
        time taken says nothing about which digest (or how much of one) matched."""
        presented = key_digest(credential).encode()
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(presented, digest.encode())
        return found

    def to_json(self) -> dict:
        return {"digests": list(self.digests)}

    @classmethod
    def from_json(cls, data: object) -> "ServiceKeys":
        if data is None:
            return cls()
        if not isinstance(data, dict) or not isinstance(data.get("digests", []), list):
            raise ValueError("service keys are a JSON object with a `digests` list")
        return cls(tuple(data.get("digests", [])))


NO_KEYS = ServiceKeys()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The credential of `Authorization: Bearer <x>` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    credential = rest.strip()
    if scheme.lower() != "bearer" or not credential or _SPACE.search(credential):
        return None
    return credential


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts whose first is a JSON header naming a signing algorithm (not `none`):
    the shape of every token the API server could vouch for. Anything else is not worth a review."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_B64URL.fullmatch(p) for p in parts):
        return False
    head = parts[0]
    if len(head) > 2048:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    alg = header.get("alg") if isinstance(header, dict) else None
    return isinstance(alg, str) and alg.lower() not in ("", "none")


@functools.lru_cache(maxsize=4096)
def _peer(peer: str):
    """A peer's address, parsed once per distinct peer (clients come back; parsing is the costly part)."""
    return parse_address(peer)


def decide(policy: AccessPolicy, keys: ServiceKeys, peer: str | None, authorization: str | None) -> Allow | Review | Refuse:
    """May a request from `peer` carrying `authorization` (the header as sent, or None) reach the service
    whose API-key digests are `keys`? Allow, ask the cluster (Review), or the refusal to answer with."""
    if policy.mode is AccessMode.OPEN:
        return Allow("open")
    ip = _peer(peer) if peer and len(peer) <= 64 else None  # an address is at most 45 characters, zone aside
    if ip is not None and ip.is_loopback:
        return Allow("loopback")
    if ip is not None and ip in policy._index:
        return Allow("network")
    if not authorization or not authorization.strip():
        return _NO_CREDENTIAL
    if len(authorization) > MAX_CREDENTIAL + 16:
        return _TOO_LONG
    credential = bearer(authorization)
    if credential is None:
        return _NOT_BEARER
    if keys.digests and keys.matches(credential):
        return Allow("api-key")
    if looks_like_jwt(credential):
        return Review(credential)
    return _REFUSED


_REVIEW_CODES = {401: "invalid_token", 403: "token_refused", 429: "rate_limited", 503: "cluster_unavailable"}


def review_refusal(reason: str, status: int = 403) -> Refuse:
    """The refusal for a token the cluster did not vouch for (`reason` is the agent's, never the token).
    `status` as the agent's reviewer gave it: 401 unknown token, 403 not allowed, 429 over the budget of
    reviews (send Retry-After), 503 the cluster could not be asked; anything else is 403."""
    if status not in _REVIEW_CODES:
        status = 403
    return Refuse(status, _REVIEW_CODES[status], f"the cluster did not allow this token to use this model: {reason}"[:300])


def error_body(refusal: Refuse) -> dict:
    """The JSON body of a refusal, in the one shape of the front door's errors (core/openai_errors.py)."""
    return openai_errors.error_body(refusal.status, refusal.code, refusal.message)


def challenge(refusal: Refuse) -> dict[str, str]:
    """Headers to send with a refusal: a 401 says which scheme would work (RFC 6750)."""
    return {"WWW-Authenticate": 'Bearer realm="metal-agent"'} if refusal.status == 401 else {}


# -- the agent's side: settings and the question it asks the cluster ---------------------------------

PROXY_GROUP = "inference.llmkube.dev"
PROXY_RESOURCE = "inferenceservices"
PROXY_SUBRESOURCE = "proxy"
PROXY_VERB = "get"


@dataclass(frozen=True)
class AccessSettings:
    """`--front-door-access` and `--front-door-allow-network`, and the review budget (as for /metrics)."""

    mode: AccessMode = AccessMode.CLUSTER
    allow_networks: tuple[str, ...] = ()
    token_review_rate: float = PER_SOURCE_RATE  # reviews of unknown tokens per second per source (core/review_limits.py)
    token_review_global_rate: float = GLOBAL_RATE

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", AccessMode(self.mode))
        for cidr in self.allow_networks:
            try:
                _network(cidr)
            except ValueError as err:
                raise ValueError(f"--front-door-allow-network {cidr!r}: {err}") from None


def proxy_access_review(user: dict, verb: str, service: str) -> dict:
    """May `user` use InferenceService `service` ("ns/name") through the front door: verb `get` on
    `inferenceservices/proxy`, as `kubectl proxy`-style access to a Service or Pod is asked."""
    namespace, _, name = service.partition("/")
    return review_about(user, {"resourceAttributes": {
        "group": PROXY_GROUP, "resource": PROXY_RESOURCE, "subresource": PROXY_SUBRESOURCE,
        "verb": verb, "namespace": namespace, "name": name}})


# -- the `/review` answer on the agent's socket: what the front door may cache, and for how long --------

REVIEW_ALLOWED_TTL_S = 60.0
REVIEW_REFUSED_TTL_S = 10.0  # a newly granted role takes effect within seconds


def review_answer(status: int, reason: str, retry_after: float = 0.0) -> dict:
    """The agent's JSON answer to `POST /review`: `allowed`/`reason` (the brief's), plus the reviewer's
    `status` and `retry_after`, so the front door can tell "refused" from "ask again later"."""
    return {"allowed": status == 200, "reason": reason, "status": status, "retry_after": retry_after}


def review_outcome(answer: dict) -> tuple[Refuse | None, float, float]:
    """(None if allowed else the refusal to send, seconds the front door may cache it, Retry-After seconds).
    429 (over the budget of reviews) and 503 (the cluster could not be asked) are never cached: the next
    request asks again. An answer without `status` (an older agent) is 200 if allowed, else 403."""
    allowed = answer.get("allowed") is True
    status = answer.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        status = 200 if allowed else 403
    if allowed and status == 200:
        return None, REVIEW_ALLOWED_TTL_S, 0.0
    retry = answer.get("retry_after")
    retry = float(retry) if isinstance(retry, (int, float)) and not isinstance(retry, bool) and 0 <= retry <= 3600 else 0.0
    refusal = review_refusal(str(answer.get("reason", ""))[:200], status)
    if refusal.status in (429, 503):
        return refusal, 0.0, max(retry, 1.0)
    return refusal, REVIEW_REFUSED_TTL_S, 0.0
