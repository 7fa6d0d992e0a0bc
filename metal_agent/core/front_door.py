"""The front door's routing table: the agent's instruction to the data plane (issue 21).

The agent (control plane) computes a table and pushes it whole over the front
door's Unix socket; the front door (data plane) validates it here before it
touches a single listener. A table is refused whole on the first bad field,
with a message naming the route, so a half-applied table can never leave a
service pointing at the wrong engine: the previous table keeps serving.

The `access` blobs are opaque here (core/access.py owns their shape); they are
only carried so the proxy can hand them to the access decision.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Mapping

__all__ = [
    "Admission", "Route", "RouteState", "Table", "TableError", "admit", "models_body",
    "parse_table", "retry_after_s",
]

MAX_ROUTES = 4096


class TableError(ValueError):
    """The table is refused; the message says which field of which route and why."""


class RouteState(StrEnum):
    SERVING = "serving"
    STARTING = "starting"
    STOPPED = "stopped"
    # Unloaded while idle (load on demand): a request is held and wakes it; the agent loads it.
    SLEEPING = "sleeping"


@dataclass(frozen=True)
class Route:
    key: str
    model: str
    port: int
    upstream: tuple[str, int] | None
    state: RouteState
    max_inflight: int = 4
    queue: int = 64
    queue_timeout_s: float = 30.0
    access: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def holds(self) -> bool:
        """Requests wait (rather than go upstream) while the route has nowhere to go yet."""
        return self.upstream is None or self.state is not RouteState.SERVING

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "model": self.model, "port": self.port,
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}" if self.upstream else None,
            "state": self.state.value, "max_inflight": self.max_inflight, "queue": self.queue,
            "queue_timeout_s": self.queue_timeout_s, "access": self.access,
        }


@dataclass(frozen=True)
class Table:
    version: int
    listen_host: str
    client_port: int
    routes: tuple[Route, ...]
    access: Mapping[str, Any] | None = field(default=None, compare=False)

    def by_key(self, key: str) -> Route | None:
        for route in self.routes:
            if route.key == key:
                return route
        return None

    def by_model(self, model: str) -> Route | None:
        """The client port's routing: the request's `model` is the InferenceService's name.

        A stopped route is still listed (so `/v1/models` shows every model of the Mac), but
        its requests are answered 503 at once; a sleeping one's are held while the agent loads
        it on demand. A model that must not be served is one the agent leaves out of the table.
        """
        for route in self.routes:
            if route.model == model:
                return route
        return None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "listen_host": self.listen_host,
                "client_port": self.client_port, "access": self.access,
                "routes": [r.to_json() for r in self.routes]}


EMPTY = Table(version=0, listen_host="127.0.0.1", client_port=0, routes=())


def _need(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise TableError(f"{where}: `{name}` is missing")
    value = obj[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise TableError(f"{where}: `{name}` must be {_kind_name(kind)}, not {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _port(value: int, where: str, name: str, *, zero_ok: bool = False) -> int:
    if not (0 if zero_ok else 1) <= value <= 65535:
        raise TableError(f"{where}: `{name}` {value} is not a port")
    return value


def _host(value: str, where: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise TableError(f"{where}: `listen_host` {value!r} is not an IP address") from None
    return value


def _upstream(value: Any, where: str) -> tuple[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, str) or ":" not in value:
        raise TableError(f"{where}: `upstream` must be \"host:port\" or null, not {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise TableError(f"{where}: `upstream` host {host!r} is not an IP address") from None
    if not port.isdigit():
        raise TableError(f"{where}: `upstream` port {port!r} is not a number")
    return host, _port(int(port), where, "upstream")


def _positive_int(obj: Mapping[str, Any], name: str, default: int, where: str, *, zero_ok: bool) -> int:
    if name not in obj:
        return default
    value = _need(obj, name, int, where)
    if value < (0 if zero_ok else 1) or value > 1_000_000:
        raise TableError(f"{where}: `{name}` {value} is out of range")
    return value


def _route(obj: Any, index: int) -> Route:
    where = f"routes[{index}]"
    if not isinstance(obj, dict):
        raise TableError(f"{where}: must be an object")
    key = _need(obj, "key", str, where)
    where = f"route {key!r}"
    if key.count("/") != 1 or not all(key.split("/")):
        raise TableError(f"{where}: `key` must be \"namespace/name\"")
    model = _need(obj, "model", str, where)
    if not model:
        raise TableError(f"{where}: `model` is empty")
    state_text = _need(obj, "state", str, where)
    try:
        state = RouteState(state_text)
    except ValueError:
        raise TableError(f"{where}: `state` {state_text!r} is not serving, starting, stopped or sleeping") from None
    upstream = _upstream(obj.get("upstream"), where)
    if state is RouteState.SERVING and upstream is None:
        raise TableError(f"{where}: a serving route needs an `upstream`")
    timeout = obj.get("queue_timeout_s", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and 0 < timeout <= 3600):
        raise TableError(f"{where}: `queue_timeout_s` must be a number of seconds in (0, 3600]")
    access = obj.get("access")
    if access is not None and not isinstance(access, dict):
        raise TableError(f"{where}: `access` must be an object or null")
    return Route(
        key=key, model=model, port=_port(_need(obj, "port", int, where), where, "port"),
        upstream=upstream, state=state,
        max_inflight=_positive_int(obj, "max_inflight", 4, where, zero_ok=False),
        queue=_positive_int(obj, "queue", 64, where, zero_ok=True),
        queue_timeout_s=float(timeout), access=access)


def parse_table(obj: Any) -> Table:
    """Validate a decoded table; raise TableError naming the first bad field."""
    if not isinstance(obj, dict):
        raise TableError("the table must be a JSON object")
    version = _need(obj, "version", int, "table")
    listen_host = _host(_need(obj, "listen_host", str, "table"), "table")
    client_port = _port(_need(obj, "client_port", int, "table"), "table", "client_port", zero_ok=True)
    raw_routes = _need(obj, "routes", list, "table")
    if len(raw_routes) > MAX_ROUTES:
        raise TableError(f"table: {len(raw_routes)} routes is more than {MAX_ROUTES}")
    access = obj.get("access")
    if access is not None and not isinstance(access, dict):
        raise TableError("table: `access` must be an object or null")
    routes = tuple(_route(r, i) for i, r in enumerate(raw_routes))
    _unique(routes, client_port)
    return Table(version=version, listen_host=listen_host, client_port=client_port,
                 routes=routes, access=access)


def _unique(routes: tuple[Route, ...], client_port: int) -> None:
    seen_keys: set[str] = set()
    seen_ports: dict[int, str] = {}
    seen_models: dict[str, str] = {}
    for route in routes:
        if route.key in seen_keys:
            raise TableError(f"route {route.key!r}: the key appears twice")
        seen_keys.add(route.key)
        if route.port in seen_ports:
            raise TableError(f"route {route.key!r}: port {route.port} is also {seen_ports[route.port]!r}'s")
        if route.port == client_port:
            raise TableError(f"route {route.key!r}: port {route.port} is the client port")
        seen_ports[route.port] = route.key
        if route.model in seen_models:
            raise TableError(f"route {route.key!r}: model {route.model!r} is also "
                             f"{seen_models[route.model]!r}'s; the client port could not tell them apart")
        seen_models[route.model] = route.key


class Admission(StrEnum):
    GO = "go"          # a slot is free: straight upstream
    WAIT = "wait"      # join the FIFO queue
    REFUSE = "refuse"  # the queue is full: 429 (503 while the route holds)


def admit(*, holds: bool, inflight: int, queued: int, max_inflight: int, queue: int) -> Admission:
    """Where a new request goes. FIFO: nobody jumps a non-empty queue, even if a slot is free."""
    if not holds and queued == 0 and inflight < max_inflight:
        return Admission.GO
    if queued < queue:
        return Admission.WAIT
    return Admission.REFUSE


def retry_after_s(*, holds: bool, queued: int, max_inflight: int, queue_timeout_s: float) -> int:
    """A `Retry-After` hint in whole seconds: a loading model is worth a few seconds' wait; a
    busy one roughly one request's worth per queued slot round, bounded by the queue timeout."""
    if holds:
        return max(1, min(int(queue_timeout_s), 5))
    rounds = queued // max(1, max_inflight) + 1
    return max(1, min(rounds, int(math.ceil(queue_timeout_s))))


def models_body(table: Table, created: int) -> dict[str, Any]:
    """`GET /v1/models` on the client port: every model the table offers, OpenAI-shaped."""
    return {"object": "list", "data": [
        {"id": r.model, "object": "model", "created": created, "owned_by": r.key.split("/")[0],
         "metal_agent": {"key": r.key, "state": r.state.value}}
        for r in table.routes]}
