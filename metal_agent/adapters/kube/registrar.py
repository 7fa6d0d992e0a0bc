"""Apply, refresh and remove each service's Service and EndpointSlice.

Writes are server-side applies with our field manager: idempotent, made
only when the desired content changed, and never a delete-and-recreate, so
the ClusterIP survives respawns. The heartbeat, which LLMKube's controller
reads to tell a live Mac from a dead one, is an apply of the whole slice: the
same one call per slice per interval as a patch of the annotation, and it
re-creates a slice someone deleted and repairs one someone edited, because
what is in the cluster is observed state, not something our cache can vouch
for. The Service is re-applied every few minutes for the same reason.

The names come from a stranger's InferenceService, so a Service or slice of
that name that someone else made is never written over or deleted
(`owned.py`: look first, and every apply guarded by a resourceVersion, so it
creates only where nothing exists and updates only our object as last seen);
`ensure` then raises `NameTaken` and the reconciler reports
`ServiceNameConflict`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import defaultdict
from dataclasses import replace
from typing import Callable, Iterable

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters.kube.owned import APPLY, FIELD_MANAGER, NameTaken, delete_exactly, owned_services, owned_slices, owner_uids
from metal_agent.core.registration import (
    ISVC_LABEL,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    Registration,
    desired_service,
    desired_slice,
    ours,
    service_name,
    slice_name,
)

log = structlog.get_logger(__name__)

__all__ = ["APPLY", "FIELD_MANAGER", "NameTaken", "Registrar"]
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"
SERVICE_RECHECK_S = 600.0  # re-apply a registered Service this often (a deleted one comes back)


def rfc3339_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _ours_for(isvc_name: str, isvc_uid: str = ""):
    """The `ours` rule of core.registration for one InferenceService, on an object's metadata."""
    return lambda meta: ours(meta.labels, owner_uids(meta), isvc_name, isvc_uid)


class Registrar:
    def __init__(self, api: client.ApiClient, *, agent_version: str, host: str = "") -> None:
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.services = owned_services(self.core)
        self.slices = owned_slices(self.discovery)
        self.agent_version = agent_version
        self.host = host  # this Mac's name, the `llmkube.ai/host` label of its slices
        self.member: str | None = None  # fleet mode (adapters/kube/fleet_registrar.py): slices named for the Mac
        self._applied: dict[str, Registration] = {}  # "namespace/isvc" -> last applied
        self._withdrawn: set[str] = set()  # slice known to be absent: withdrawing again costs no call
        self._service_applied_at: dict[str, float] = {}
        # One change at a time per service: a heartbeat must never re-create a slice that a
        # reconcile is withdrawing at the same moment (that would announce a dead endpoint).
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def registered(self, key: str) -> bool:
        return key in self._applied

    async def ensure(self, reg: Registration) -> bool:
        """Make the cluster match `reg`; True if anything was written."""
        key = f"{reg.namespace}/{reg.isvc_name}"
        async with self._locks[key]:
            if self._applied.get(key) == reg:
                return False
            await self._apply(key, reg)
            return True

    async def _apply(self, key: str, reg: Registration) -> None:
        previous = self._applied.get(key)
        stale = time.monotonic() - self._service_applied_at.get(key, float("-inf")) > SERVICE_RECHECK_S
        owned = _ours_for(reg.isvc_name, reg.isvc_uid)
        if previous is None or stale or (previous.port, previous.isvc_uid, previous.service_port) != (reg.port, reg.isvc_uid, reg.service_port):
            try:
                await self.services.apply(reg.namespace, service_name(reg.isvc_name), desired_service(reg), owned,
                                          claimant=reg.isvc_name)
            except NameTaken:
                # Someone else's Service has the name: no slice of ours may send its traffic to this Mac.
                self._applied.pop(key, None)
                self._service_applied_at.pop(key, None)
                await self.slices.delete(reg.namespace, slice_name(reg.isvc_name, reg.member), owned, quiet=True)
                raise
            self._service_applied_at[key] = time.monotonic()
        try:
            await self.slices.apply(
                reg.namespace, slice_name(reg.isvc_name, reg.member),
                desired_slice(reg, heartbeat=rfc3339_now(), agent_version=self.agent_version, host=self.host), owned,
                claimant=reg.isvc_name)
        except NameTaken:
            self._applied.pop(key, None)
            raise
        if previous is None:
            await self._remove_go_agent_slice(reg.namespace, reg.isvc_name)
        self._applied[key] = reg
        self._withdrawn.discard(key)

    async def _remove_go_agent_slice(self, namespace: str, isvc_name: str) -> None:
        """LLMKube's Go agent named its slice after the Service and leaves it behind when it
        stops: after a switch, LLMKube's controller would count its dead endpoint as a second
        replica and kube-proxy would send traffic to its port. Ours is registered by now, so
        there is no moment without a slice."""
        name = service_name(isvc_name)
        try:
            obj = await self.discovery.read_namespaced_endpoint_slice(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return
            raise
        if ours(obj.metadata.labels, [], isvc_name, ""):
            await self._delete(self.discovery.delete_namespaced_endpoint_slice, obj.metadata)
            log.info("removed the Go agent's leftover EndpointSlice", service=f"{namespace}/{isvc_name}", slice=name)

    async def heartbeat(self) -> tuple[int, int]:
        """Re-apply every registered slice with a fresh heartbeat, all at once: a slow call
        for one service never makes another's heartbeat late. Returns (sent, failed)."""
        regs = list(self._applied.items())
        results = await asyncio.gather(*(self._beat(key, reg) for key, reg in regs), return_exceptions=True)
        failed = 0
        for (key, _), result in zip(regs, results):
            if isinstance(result, Exception):
                failed += 1
                log.warning("heartbeat failed; the next one retries", service=key,
                            error=f"{type(result).__name__}: {result}")
        return len(regs), failed

    async def mark_not_ready(self, namespace: str, isvc_name: str) -> None:
        """Say "not ready" before the process behind a ready slice is stopped, so the cluster
        stops sending traffic before the port dies, not one API round trip after."""
        key = f"{namespace}/{isvc_name}"
        async with self._locks[key]:
            reg = self._applied.get(key)
            if reg is not None and reg.ready:
                await self._apply(key, replace(reg, ready=False))

    async def _beat(self, key: str, reg: Registration) -> None:
        async with self._locks[key]:
            if self._applied.get(key) == reg:  # withdrawn or changed meanwhile: nothing to refresh
                await self._apply(key, reg)

    async def withdraw(self, namespace: str, isvc_name: str) -> None:
        """Delete the slice only: nothing serves, but the Service (and its ClusterIP, which
        clients may have cached) stays for when the model comes back."""
        key = f"{namespace}/{isvc_name}"
        async with self._locks[key]:
            if key in self._withdrawn:
                return
            self._applied.pop(key, None)
            await self.slices.delete(namespace, slice_name(isvc_name, self.member), _ours_for(isvc_name))
            self._withdrawn.add(key)

    async def remove(self, namespace: str, isvc_name: str) -> None:
        """Delete the Service and slice of one InferenceService, if they are ours."""
        key = f"{namespace}/{isvc_name}"
        await self.withdraw(namespace, isvc_name)
        async with self._locks[key]:
            # Only by our label: the InferenceService (and so its uid) is gone.
            await self.services.delete(namespace, service_name(isvc_name), _ours_for(isvc_name))
            self._withdrawn.discard(key)
            self._service_applied_at.pop(key, None)

    async def cleanup(self, namespaces: Iterable[str] | None, keep_service: Callable[[str, str], bool],
                      keep_slice: Callable[[str, str], bool]) -> int:
        """Delete our objects whose InferenceService is not served, and legacy Endpoints. Returns deletions.

        A Service is kept while its InferenceService is ours at all (scaled to zero
        included: its ClusterIP must survive); a slice only while a process should serve.
        """
        deleted = 0
        scopes = list(namespaces) if namespaces else [None]
        for ns in scopes:
            for lister, deleter, keep in (
                (self.core.list_service_for_all_namespaces if ns is None else self.core.list_namespaced_service,
                 self.core.delete_namespaced_service, keep_service),
                (self.discovery.list_endpoint_slice_for_all_namespaces if ns is None else self.discovery.list_namespaced_endpoint_slice,
                 self.discovery.delete_namespaced_endpoint_slice, keep_slice),
            ):
                listing = await (lister(label_selector=MANAGED_SELECTOR) if ns is None else lister(ns, label_selector=MANAGED_SELECTOR))
                for obj in listing.items:
                    meta = obj.metadata
                    isvc = (meta.labels or {}).get(ISVC_LABEL, "")
                    if isvc and keep(meta.namespace, isvc):
                        continue
                    await self._delete(deleter, meta)
                    self._applied.pop(f"{meta.namespace}/{isvc}", None)
                    deleted += 1
            # Endpoints written by old agents get mirrored into extra slices that blackhole traffic.
            endpoints = await (self.core.list_endpoints_for_all_namespaces(label_selector=MANAGED_SELECTOR) if ns is None
                               else self.core.list_namespaced_endpoints(ns, label_selector=MANAGED_SELECTOR))
            for obj in endpoints.items:
                await self._delete(self.core.delete_namespaced_endpoints, obj.metadata)
                deleted += 1
        return deleted

    async def _delete(self, deleter, meta) -> None:
        """Delete a listed object of ours exactly as listed (uid and resourceVersion)."""
        if await delete_exactly(deleter, meta):
            log.info("deleted leftover object", name=f"{meta.namespace}/{meta.name}")
