"""Who may read the agent's HTTP endpoint from the network: the cluster decides.

A scrape that arrives on a non-loopback address must carry a bearer token
the cluster vouches for: a TokenReview says who it is, then a
SubjectAccessReview asks whether that identity may `get` the non-resource
URL it asked for (`/metrics`). That is the check controller-runtime's
metrics filter and kube-rbac-proxy make, so the ClusterRole a Prometheus
already has for them (`nonResourceURLs: ["/metrics"], verbs: ["get"]`)
works here too. No token or a token the cluster does not know is 401; a
known identity without the permission is 403. `/healthz` and `/readyz` stay
open (they reveal nothing but "alive" and "ready"), and so does loopback:
whoever can connect to 127.0.0.1 on the Mac is already on the Mac, where
the same numbers are a `ps` or `powermetrics` away.

Decisions are cached briefly (keyed by a digest of the token, never the
token) so that a Prometheus scraping every few seconds costs the API server
two reviews a minute, not two per scrape; denials are cached for less, so a
newly granted role takes effect within seconds. While the API server cannot
be asked, a token allowed within the last ten minutes stays allowed: an
outage is when the Mac's metrics matter most, and a revoked token gains at
most that long, only while nobody can check it.

Reviews of tokens the cluster has not vouched for are budgeted per source
address and in all (`core/review_limits.py`): beyond the budget the answer
is 429 and nothing is sent to the API server.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
ALLOWED_TTL_S = 60.0
DENIED_TTL_S = 10.0
STALE_ALLOWED_S = 600.0  # how long an expired "allowed" still serves while the API server is away
MAX_CACHED = 1024  # distinct allowed (token, verb, path) decisions kept; the oldest go first
MAX_DENIED = 4096  # refusals kept, apart: junk tokens push out only other junk

# The API server's own mapping of HTTP methods to authorizer verbs.
_VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True, slots=True)
class Verdict:
    status: int  # 200 allowed, 401 unauthenticated, 403 forbidden, 429 over the review budget, 503 cluster away
    reason: str
    user: str = ""
    retry_after: float = 0.0  # with 429: seconds until a review could be sent

    @property
    def allowed(self) -> bool:
        return self.status == 200


def is_loopback(address: str | None) -> bool:
    """Whether a connection's local address is loopback (IPv4-mapped IPv6 included).
    Unknown or unparsable counts as not loopback: then the request is authenticated."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def needs_authentication(local_address: str | None, path: str) -> bool:
    return path not in OPEN_PATHS and not is_loopback(local_address)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token and " " not in token else None


def verb_for(method: str) -> str:
    return _VERBS.get(method.upper(), method.lower())


def token_review(token: str) -> dict:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}


def identity(review_status: dict) -> dict | None:
    """The user a TokenReview's status names, or None if the token was not accepted."""
    if not review_status.get("authenticated"):
        return None
    user = review_status.get("user") or {}
    return user if user.get("username") else None


def subject_access_review(user: dict, verb: str, path: str) -> dict:
    """May `user` (a TokenReview's status.user) do `verb` on the non-resource URL `path`?"""
    return review_about(user, {"nonResourceAttributes": {"path": path, "verb": verb}})


def review_about(user: dict, attributes: dict) -> dict:
    """A SubjectAccessReview of `user` (a TokenReview's status.user, all of it: groups carry
    most grants) about `attributes` (`nonResourceAttributes` or `resourceAttributes`)."""
    spec: dict = {"user": user["username"], **attributes}
    if user.get("uid"):
        spec["uid"] = user["uid"]
    if user.get("groups"):
        spec["groups"] = list(user["groups"])
    if user.get("extra"):
        spec["extra"] = {k: list(v) for k, v in user["extra"].items()}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


def verdict(review_status: dict, access_status: dict | None, verb: str, path: str) -> Verdict:
    """The answer to a request from its two reviews (`access_status` None: not asked)."""
    user = identity(review_status)
    if user is None:
        why = review_status.get("error") or "token not accepted by the cluster"
        return Verdict(401, f"unauthenticated: {why}")
    name = user["username"]
    if access_status is not None and access_status.get("allowed") and not access_status.get("denied"):
        return Verdict(200, "allowed", name)
    return Verdict(403, f'forbidden: {name} may not {verb} "{path}"', name)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


Key = tuple[str, str, str]  # (token digest, verb, path)


class DecisionCache:
    """Recent verdicts per (token digest, verb, path), allowed ones longer than denied ones.

    Allowed and denied verdicts are kept apart, each bounded, so that a
    flood of made-up tokens (each a cached 401) pushes out only other
    refusals, never the allowed verdict of the Prometheus that scrapes
    during it. A 401 says the token itself is unknown, whatever it asked
    for, so it is cached by the token's digest alone: the same junk token on
    another path is not reviewed again. A 503 (the cluster could not be
    asked) is never cached: the next request asks again.
    """

    def __init__(self, *, clock: Callable[[], float], allowed_ttl: float = ALLOWED_TTL_S,
                 denied_ttl: float = DENIED_TTL_S, stale_allowed: float = STALE_ALLOWED_S,
                 max_entries: int = MAX_CACHED, max_denied: int = MAX_DENIED) -> None:
        self._clock = clock
        self._allowed_ttl = allowed_ttl
        self._denied_ttl = denied_ttl
        self._stale_allowed = stale_allowed
        self._max = max_entries
        self._max_denied = max_denied
        self._allowed: OrderedDict[Key, tuple[float, Verdict]] = OrderedDict()
        self._denied: OrderedDict[Key, tuple[float, Verdict]] = OrderedDict()

    @staticmethod
    def key(token: str, verb: str, path: str) -> Key:
        return token_digest(token), verb, path

    @staticmethod
    def _unknown(key: Key) -> Key:
        return key[0], "", ""

    def get(self, key: Key) -> Verdict | None:
        """A fresh verdict, or None (ask the cluster)."""
        now = self._clock()
        if (entry := self._allowed.get(key)) is not None:
            if now < entry[0]:
                return entry[1]
            if now >= entry[0] + self._stale_allowed:
                del self._allowed[key]  # an expired "allowed" stays a while for stale_allowed()
        for denied in (self._unknown(key), key):
            if (entry := self._denied.get(denied)) is not None:
                if now < entry[0]:
                    return entry[1]
                del self._denied[denied]
        return None

    def known(self, key: Key) -> bool:
        """The cluster allowed this token this request recently (fresh, or expired less than
        `stale_allowed` ago): a re-review goes on the known lane, never behind unknown tokens."""
        entry = self._allowed.get(key)
        return entry is not None and self._clock() < entry[0] + self._stale_allowed

    def stale_allowed(self, key: Key) -> Verdict | None:
        """The cluster cannot be asked: an "allowed" that expired less than `stale_allowed` ago."""
        return self._allowed[key][1] if self.known(key) else None

    def put(self, key: Key, found: Verdict) -> None:
        if found.status not in (200, 401, 403):
            return
        if found.allowed:
            store, bound, ttl = self._allowed, self._max, self._allowed_ttl
        else:
            store, bound, ttl = self._denied, self._max_denied, self._denied_ttl
            if found.status == 401:
                key = self._unknown(key)
        store[key] = (self._clock() + ttl, found)
        store.move_to_end(key)
        while len(store) > bound:
            store.popitem(last=False)

    def __len__(self) -> int:
        return len(self._allowed) + len(self._denied)
