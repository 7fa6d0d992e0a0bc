"""Requests to the agent's HTTP endpoint that a web browser could have made for someone else: refused.

The agent's local API (`--listen`, loopback) changes what the Mac does
(`POST /v1/fleet/drain`, `/v1/fleet/uncordon`) and tells more than metrics
(`GET /v1/services`, `/v1/fleet`). Loopback alone is no boundary against a
browser on the same Mac: any web page its owner visits can send a "simple"
cross-site request there (a form, or a `fetch` with `text/plain`), and with
DNS rebinding (a name of the attacker's that answers 127.0.0.1) can even
read the answers as if they were its own origin. Three things a browser
always does, and a page cannot change, close both:

- Cross-origin, `Content-Type: application/json` is not a "simple" request:
  the browser first asks with an OPTIONS preflight, which the agent never
  answers with CORS headers, so the real request is never sent.
- A browser sends `Origin` on every cross-origin request and every POST;
  `Origin: null` (sandboxed frames, `file:` pages) is just as foreign.
- A rebinding page's requests name the page's own host in `Host`; nothing
  legitimate addresses the agent but by a loopback name, the address the
  connection arrived on, or a name the Mac's owner lists.

So a request passes only if each part is on an allowlist (`check`): the
method (GET, HEAD, POST; no OPTIONS, so no preflight is ever answered), the
Host, the Origin (absent, or the agent's own), `Sec-Fetch-Site` (absent,
`none` or `same-origin`), and for a POST the content type (JSON). The
health probes stay open: they tell nothing but "alive" and "ready", and
whatever probes them may not say who it is. The CLI, curl, Prometheus and
kubelet-style clients send none of the browser headers and pass unchanged.

Pure: the adapter (`adapters/http_server.guard_middleware`) hands in the
request's facts and answers a refusal with 403 and a JSON body.
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.core.egress import parse_address

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
METHODS = frozenset({"GET", "HEAD", "POST"})
READ_METHODS = frozenset({"GET", "HEAD"})
JSON = "application/json"
SAME_SITE = frozenset({"none", "same-origin"})  # Sec-Fetch-Site values that are no other site's doing
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})

# Refusal reasons (a metric label and the JSON body's `reason`).
METHOD_NOT_ALLOWED = "MethodNotAllowed"
FOREIGN_HOST = "ForeignHost"
FOREIGN_ORIGIN = "ForeignOrigin"
CROSS_SITE = "CrossSite"
NOT_JSON = "ContentTypeNotJSON"


@dataclass(frozen=True, slots=True)
class RequestFacts:
    method: str
    path: str
    host: str | None  # the Host header as sent
    origin: str | None
    content_type: str | None
    fetch_site: str | None  # Sec-Fetch-Site
    local_address: str | None  # the address the connection arrived on


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    message: str


def host_name(host: str) -> str:
    """The name part of a Host header value (`[::1]:9090` -> `::1`, `Example:80` -> `example`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host  # a bare name, or a bare IPv6 address (not valid in Host, but harmless to read)


def host_allowed(host: str, local_address: str | None, allowed_hosts: frozenset[str]) -> bool:
    """The Host names this agent: a loopback name or address, the address the connection
    arrived on, or a name the Mac's owner listed (`--http-allowed-host`)."""
    name = host_name(host)
    if not name:
        return False
    if name in LOOPBACK_NAMES or name in allowed_hosts:
        return True
    ip = parse_address(name)
    if ip is None:
        return False
    local = parse_address(local_address) if local_address else None
    return ip.is_loopback or (local is not None and ip == local)


def _shown(value: str | None) -> str:
    """A header value for a message: quoted, and cut short (a stranger chose its length)."""
    if value is None:
        return "none"
    return repr(value if len(value) <= 80 else value[:80] + "...")


def media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def check(req: RequestFacts, allowed_hosts: frozenset[str] = frozenset()) -> Refusal | None:
    """None if the request may be served; else why not (every clause is an allowlist)."""
    method = req.method.upper()
    if req.path in OPEN_PATHS and method in READ_METHODS:
        return None
    if method not in METHODS:
        return Refusal(METHOD_NOT_ALLOWED, f"{method[:20]} is not accepted here (only GET, HEAD and POST; "
                                           "the agent answers no CORS preflight)")
    if req.host is None or not host_allowed(req.host, req.local_address, allowed_hosts):
        return Refusal(FOREIGN_HOST, f"Host {_shown(req.host)} does not name this agent (a loopback name, the address "
                                     "it listens on, or a name given with --http-allowed-host)")
    if req.origin is not None and req.origin.strip().lower() != f"http://{req.host.strip().lower()}":
        return Refusal(FOREIGN_ORIGIN, f"requests from another origin ({_shown(req.origin)}) are not accepted; "
                                       "the agent's API is for local tools, not web pages")
    if req.fetch_site is not None and req.fetch_site.strip().lower() not in SAME_SITE:
        return Refusal(CROSS_SITE, f"a {_shown(req.fetch_site)} request (Sec-Fetch-Site) is not accepted")
    if method not in READ_METHODS and media_type(req.content_type) != JSON:
        return Refusal(NOT_JSON, f"{method} needs Content-Type: {JSON} (got {_shown(req.content_type)})")
    return None
