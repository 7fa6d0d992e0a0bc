"""Register this agent's own metrics endpoint: the shared `metal-agent` Service and this Mac's slice.

Server-side applies like the model objects (`registrar.py`), with the same
heartbeat: every apply of the slice refreshes its heartbeat annotation and
re-creates it if someone deleted it. The slice goes when the agent stops
(its endpoint is gone with it); the Service, shared with every other Mac,
stays. A slice left by an agent that died says how stale it is in its
heartbeat, and the next agent on that Mac applies over it.
The same rule as the model objects' holds (`owned.py`): a `metal-agent`
Service or slice of that name without our labels is someone else's, never
written over or deleted; `ensure` raises `NameTaken` and the endpoint loop says
so in its log and keeps trying.
"""

from __future__ import annotations

import time

import structlog
from kubernetes_asyncio import client

from metal_agent.adapters.kube.owned import owned_services, owned_slices
from metal_agent.adapters.kube.registrar import SERVICE_RECHECK_S, rfc3339_now
from metal_agent.core.agent_registration import (
    AGENT_LABELS,
    AGENT_SERVICE,
    AgentEndpoint,
    agent_slice_name,
    desired_agent_service,
    desired_agent_slice,
)

log = structlog.get_logger(__name__)


def _ours(meta) -> bool:
    labels = meta.labels or {}
    return all(labels.get(k) == v for k, v in AGENT_LABELS.items())


class AgentRegistrar:
    def __init__(self, api: client.ApiClient, *, agent_version: str) -> None:
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.services = owned_services(self.core)
        self.slices = owned_slices(self.discovery)
        self.agent_version = agent_version
        self.endpoint: AgentEndpoint | None = None
        self._service_applied: tuple[str, int, float] | None = None  # namespace, port, when

    async def ensure(self, endpoint: AgentEndpoint) -> None:
        """Apply the Service (when new or due a re-check) and this Mac's slice."""
        self.endpoint = endpoint
        applied = self._service_applied
        if applied is None or applied[:2] != (endpoint.namespace, endpoint.port) \
                or time.monotonic() - applied[2] > SERVICE_RECHECK_S:
            await self.services.apply(endpoint.namespace, AGENT_SERVICE,
                                      desired_agent_service(endpoint.namespace, endpoint.port), _ours)
            self._service_applied = (endpoint.namespace, endpoint.port, time.monotonic())
        await self.slices.apply(
            endpoint.namespace, agent_slice_name(endpoint.host),
            desired_agent_slice(endpoint, heartbeat=rfc3339_now(), agent_version=self.agent_version), _ours)

    async def heartbeat(self) -> None:
        if self.endpoint is not None:
            await self.ensure(self.endpoint)

    async def remove(self) -> None:
        """Delete this Mac's slice, if it is still ours (our labels, by uid)."""
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is None:
            return
        await self.slices.delete(endpoint.namespace, agent_slice_name(endpoint.host), _ours)
