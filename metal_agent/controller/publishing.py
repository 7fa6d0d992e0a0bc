"""Publishing a service's address: its Service and EndpointSlice, and following this Mac's address.

The reconciler decides *when* a service is published, withdrawn or removed;
this module does the writes, with the rules that keep publishing from ever
touching a model: a refused or failed write is retried (soon, then less
often), a name held by someone else's object is left untouched and reported
once per message, and without registration (`--no-register`) every call is a
no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping, Protocol

import structlog

from metal_agent.adapters.kube.events import EventRecorder
from metal_agent.adapters.kube.registrar import NameTaken, Registrar
from metal_agent.core.backoff import Backoff
from metal_agent.core.registration import (
    SERVICE_NAME_CONFLICT,
    Registration,
    conflict_message,
    endpoint_path,
    endpoint_url,
    service_name_problem,
    service_port,
)
from metal_agent.core.status import Blocker

log = structlog.get_logger(__name__)

# A refused or failed Service/EndpointSlice write is retried soon, then less often.
REGISTRATION_BACKOFF = Backoff(initial=0.5, factor=2.0, cap=30.0, jitter=0.5)
#: A new service behind the front door: how soon to look again whether its port is bound yet.
ROUTE_WAIT_S = 0.05


@dataclass
class HostAddress:
    """Where this Mac's engines listen (`bind`) and the address published for them
    (`registered`; None: nothing is published). Built first and shared: the reconciler
    binds engines to it, the publisher and the fleet's registrar publish it, and an
    address move changes it for all of them at once."""

    bind: str
    registered: str | None = None

    def current(self) -> str | None:
        return self.registered

    def move(self, address: str, bind: str) -> None:
        self.bind = bind
        self.registered = address if self.registered else None


class _Ports(Protocol):
    async def ensure(self, key: str) -> int: ...
    async def release(self, keys: Iterable[str]) -> None: ...


class Publisher:
    def __init__(self, registrar: Registrar | None, address: HostAddress, events: EventRecorder,
                 ports: _Ports | None = None, drain: Callable[[str], Awaitable[None]] | None = None,
                 routed: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """`registrar` None, or an address that is not published: supervise only. `ports`: the
        front door's stable ports (`--front-door`): the slice points at the service's stable
        port and stays ready across engine respawns (the front door holds requests meanwhile).
        `drain(key)`: with the front door, before a stop: hold new requests, let those in
        flight finish (app/front_door_drain.py). `routed(key)`: with the front door, whether it
        has been handed the route (so listens on its port): until then the slice says not ready,
        or cluster clients would be refused by a port nobody listens on yet."""
        self.registrar = registrar if address.registered else None
        self.address = address
        self.events = events
        self.ports = ports
        self.drain = drain
        self.routed = routed
        self._failures: dict[str, int] = {}
        self._conflict_reported: dict[str, str] = {}  # key -> the ServiceNameConflict message last sent as an Event

    def registered(self, key: str) -> bool:
        return self.registrar is not None and self.registrar.registered(key)

    async def register(self, key: str, raw: dict, supervisor, *,
                       runtime: str | None = None) -> tuple[Blocker | None, float | None]:
        """Publish the service's endpoint; never lets a failure touch the process.

        Returns a problem for status (if the name cannot be registered) and a
        retry delay when the API refused or failed the write. Without a supervisor, only
        a model asleep behind the front door (`runtime`: its engine's label) is published:
        the front door answers for it.
        """
        if supervisor is None and (runtime is None or self.ports is None):
            return None, None
        if self.ports is None and supervisor.snapshot.port is None:
            return None, None
        if self.registrar is None:
            if self.ports is not None:  # unpublished, the front door still routes it (the client port)
                return await self._stable_port_only(key)
            return None, None
        name = raw["metadata"]["name"]
        if problem := service_name_problem(name):
            return Blocker("RegistrationFailed", problem), None
        try:
            if self.ports is not None:
                port, ready = await self.ports.ensure(key), self.routed is None or await self.routed(key)
            else:
                port, ready = supervisor.snapshot.port, supervisor.snapshot.ready
            reg = Registration(namespace=key.split("/", 1)[0], isvc_name=name,
                               isvc_uid=raw["metadata"].get("uid") or "", address=self.address.registered,
                               port=port, ready=ready, model=str((raw.get("spec") or {}).get("modelRef") or ""),
                               runtime=runtime or supervisor.plan.engine.runtime_label,
                               service_port=service_port(raw.get("spec")))
            await self.registrar.ensure(reg)
        except NameTaken as taken:
            # The name belongs to someone else's object: it stays untouched, the model keeps
            # serving on the Mac, and we look again (it may be removed or handed over).
            return self._name_taken(key, raw, taken)
        except Exception as err:  # noqa: BLE001 - API errors and outages alike: retry, keep serving
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = REGISTRATION_BACKOFF.delay(failures)
            log.warning("registration failed; retrying", service=key, error=f"{type(err).__name__}: {err}",
                        retry_in_s=round(delay, 2))
            return None, delay
        self._failures.pop(key, None)
        self._conflict_reported.pop(key, None)
        return None, (ROUTE_WAIT_S if self.ports is not None and not ready else None)

    async def _stable_port_only(self, key: str) -> tuple[None, float | None]:
        try:
            await self.ports.ensure(key)
        except OSError as err:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            log.warning("no stable front-door port; retrying", service=key, error=str(err))
            return None, REGISTRATION_BACKOFF.delay(failures)
        return None, None

    def _name_taken(self, key: str, raw: dict, taken: NameTaken) -> tuple[Blocker, float]:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        message = conflict_message(taken.kind, taken.namespace, taken.name)
        if self._conflict_reported.get(key) != message:
            self._conflict_reported[key] = message
            log.warning("not registering: the name is taken by an object we do not own", service=key,
                        object=f"{taken.kind} {taken.namespace}/{taken.name}")
            self.events.emit(raw["metadata"], SERVICE_NAME_CONFLICT, message, warning=True)
        else:
            log.debug("still not registering: the name is taken", service=key, attempt=failures)
        return Blocker(SERVICE_NAME_CONFLICT, message), REGISTRATION_BACKOFF.delay(failures)

    async def mark_not_ready(self, key: str) -> None:
        """Before a stop: the slice says not ready first. The API being away stops nothing.
        Behind the front door it stays ready: the front door holds requests while the engine
        is replaced (a stop for good is followed by a withdraw or an unregister); the requests
        in flight through it finish first (`drain`)."""
        if self.ports is not None:
            if self.drain is not None:
                await self.drain(key)
            return
        if self.registrar is None:
            return
        namespace, name = key.split("/", 1)
        try:
            await self.registrar.mark_not_ready(namespace, name)
        except Exception as err:  # noqa: BLE001 - the API is away: stop anyway; the slice is fixed later
            log.warning("could not mark the slice not ready before stopping", service=key,
                        error=f"{type(err).__name__}: {err}")

    async def unregister(self, key: str) -> None:
        """The service is gone for good (deleted, or no longer this Mac's): so is its stable port."""
        if self.ports is not None:
            await self.ports.release([key])
        if self.registrar is not None:
            namespace, name = key.split("/", 1)
            await self.registrar.remove(namespace, name)

    async def withdraw(self, key: str) -> None:
        """Nothing serves this key now: no slice may say otherwise (the Service stays)."""
        if self.registrar is not None:
            namespace, name = key.split("/", 1)
            await self.registrar.withdraw(namespace, name)

    def endpoint_for(self, key: str, raw: dict, mode: str) -> str | None:
        if not self.registered(key):
            return None
        namespace, name = key.split("/", 1)
        return endpoint_url(namespace, name, endpoint_path(raw.get("spec"), mode), service_port(raw.get("spec")))

    async def cleanup(self, namespaces: Iterable[str] | None, keep_service: Callable[[str, str], bool],
                      keep_slice: Callable[[str, str], bool]) -> int:
        """Remove Services/EndpointSlices (and legacy Endpoints) of services no longer ours."""
        if self.registrar is None:
            return 0
        return await self.registrar.cleanup(namespaces, keep_service, keep_slice)

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)
        self._conflict_reported.pop(key, None)


class AddressMove:
    """This Mac's detected address moved (Tailscale up after login, DHCP, another Wi-Fi):
    publish the new one, and queue every running service, so that a llama-server bound to
    the old address is respawned on the new one (the reconcile sees its host differ). An
    address given with --host-ip is the user's word and is never followed."""

    def __init__(self, *, address: HostAddress, bind_for: Callable[[str], str], running: Mapping[str, object],
                 isvcs: Mapping[str, dict], events: EventRecorder, enqueue: Callable[[str], None],
                 also: Callable[[str], None] | None = None) -> None:
        """`bind_for(address)`: where engines listen for that address; `also(address)`: one
        more follower (the agent's own metrics endpoint)."""
        self.address = address
        self.bind_for = bind_for
        self.running = running
        self.isvcs = isvcs
        self.events = events
        self.enqueue = enqueue
        self.also = also

    def __call__(self, change) -> None:
        old, new, why = change.old.address, change.new.address, change.new.reason
        log.warning("host address changed; re-registering", old=old, new=new, why=why)
        self.address.move(new, self.bind_for(new))
        for key in list(self.running):
            raw = self.isvcs.get(key)
            if raw is not None:
                self.events.emit(raw["metadata"], "HostAddressChanged",
                                 f"this Mac's address changed from {old} to {new} ({why}); re-registering",
                                 warning=True)
            self.enqueue(key)
        if self.also is not None:
            self.also(new)
