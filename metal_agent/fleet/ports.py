"""What the fleet is handed, and what it expects of each: the ports, as Protocols.

The fleet's parts are built with these (by `metal_agent.fleet.wiring` with the
real adapters, by the unit tests with small fakes), so that each part says in
its constructor exactly what it reads and writes. The settings every part takes
are `metal_agent.fleet.settings.FleetSettings`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, Protocol

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.api import InferenceServiceSpec, Model, ModelSpec
from metal_agent.core.engine import Engine
from metal_agent.core.memory import EstimateFailed, MemoryEstimate

#: What a Lease call may meet that the next tick retries: the API away, slow, or refusing.
API_ERRORS: tuple[type[BaseException], ...] = (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError)


class LeasePort(Protocol):
    """The fleet namespace's Leases (`adapters.kube.leases.LeaseClient`)."""

    async def put(self, body: dict, resource_version: str | None) -> dict: ...

    async def swap(self, body: dict) -> dict | None: ...

    async def resource_version(self, name: str) -> str | None: ...

    async def list(self, label_selector: str) -> list[dict]: ...

    async def delete(self, name: str, resource_version: str) -> None: ...


class ObjectCache(Protocol):
    """An informer's reads (`adapters.kube.informer.Informer`): by key, and all of them."""

    cache: Mapping[str, dict]

    def get(self, key: str) -> dict | None: ...

    def items(self) -> list[dict]: ...


class MemoryPort(Protocol):
    """The memory admission's books (`memory.guard.MemoryGuard`): what is committed, and how strictly."""

    committed: Mapping[str, int]
    mode: Literal["enforce", "warn"]


class ModelFilesPort(Protocol):
    """The model files on this disk (`adapters.model_files.ModelFiles`)."""

    def present(self, model: Model) -> Path | None: ...

    def engine_of(self, model: Model) -> Engine: ...

    async def memory_estimate(self, path: Path, spec: InferenceServiceSpec, engine: Engine,
                              model: ModelSpec | None = None) -> MemoryEstimate | EstimateFailed: ...


class EventSink(Protocol):
    """Kubernetes Events on the InferenceService (`adapters.kube.events.EventRecorder`)."""

    def emit(self, obj_meta: dict, reason: str, message: str, *, warning: bool = False) -> None: ...


class Slices(Protocol):
    """This Mac's EndpointSlices as the fleet needs them (`adapters.kube.fleet_registrar.FleetRegistrar`)."""

    def announced(self, key: str) -> bool:
        """Our slice for `key` was last written saying ready."""

    async def mark_member_not_ready(self, dead: str, namespaces: Iterable[str] | None) -> int:
        """Mark another Mac's slices not ready; how many changed."""
