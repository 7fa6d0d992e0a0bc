"""This agent's metrics on the network: listen on the registered address, register it, follow it.

The loopback listener (`--listen`) is for local tools; the cluster's
Prometheus needs an address it can reach, which is the one the agent
registers for its models. This loop listens there too (token-checked, see
`core/metrics_auth.py`), publishes it as this Mac's slice of the
`metal-agent` Service, refreshes that slice's heartbeat, and when the Mac's
address moves, moves both. A failure (the address cannot be bound, the API
is away) is logged and retried; it never touches the models or ends the
agent. On stop the slice is withdrawn: nothing answers there any more.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from metal_agent.adapters.http_server import Listeners
from metal_agent.adapters.kube.agent_registrar import AgentRegistrar
from metal_agent.core.agent_registration import AgentEndpoint
from metal_agent.core.backoff import Backoff
from metal_agent.tasks import within

log = structlog.get_logger(__name__)

_RETRY = Backoff(initial=1.0, factor=2.0, cap=30.0, reset_after=0.0, jitter=0.5)
_WILDCARDS = ("0.0.0.0", "::", "")


class MetricsEndpoint:
    def __init__(self, listeners: Listeners, registrar: AgentRegistrar, *, namespace: str, host: str, chip: str,
                 address: str, port: int, listen_host: str, interval: float) -> None:
        self.listeners = listeners
        self.registrar = registrar
        self.namespace, self.host, self.chip, self.port = namespace, host, chip, port
        self.listen_host = listen_host  # the loopback (or user-chosen) --listen address, already served
        self.interval = interval
        self._address = address
        self._bound: str | None = None  # the registered address we added a listener on
        self._moved = asyncio.Event()

    def move(self, address: str) -> None:
        """The Mac's address changed (AddressWatcher): rebind and re-register."""
        self._address = address
        self._moved.set()

    def _covered(self, address: str) -> bool:
        """--listen already serves this address (it is the address, or every address)."""
        return self.listen_host in _WILDCARDS or self.listen_host == address

    async def _listen(self, address: str) -> None:
        if self._bound == address:
            return
        if self._bound is not None:
            await self.listeners.remove(self._bound, self.port)
            self._bound = None
        if not self._covered(address):
            await self.listeners.add(address, self.port)
            self._bound = address
            log.info("metrics listening on the registered address (bearer token required)",
                     address=f"{address}:{self.port}")

    async def run(self) -> None:
        failures = 0
        while True:
            address = self._address
            self._moved.clear()
            try:
                await self._listen(address)
                await self.registrar.ensure(AgentEndpoint(self.namespace, self.host, self.chip, address, self.port))
                failures, delay = 0, self.interval
            except Exception as err:  # noqa: BLE001 - a busy port or an absent API: say so, try again
                failures += 1
                delay = min(_RETRY.delay(failures), self.interval)
                log.warning("cannot publish this agent's metrics endpoint; retrying",
                            address=f"{address}:{self.port}", namespace=self.namespace,
                            error=f"{type(err).__name__}: {err}", retry_in_s=round(delay, 2))
            with contextlib.suppress(TimeoutError):
                await within(self._moved.wait(), delay)

    async def withdraw(self, timeout: float = 2.0) -> None:
        """Remove this Mac's slice on the way out (best effort: a stale heartbeat tells the rest)."""
        try:
            await within(self.registrar.remove(), timeout)
        except Exception as err:  # noqa: BLE001 - shutting down: log and go
            log.warning("could not remove this agent's metrics EndpointSlice", error=f"{type(err).__name__}: {err}")
