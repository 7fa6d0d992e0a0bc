"""Registration when several Macs serve one InferenceService behind one Service.

Each serving Mac applies its own EndpointSlice, named and labelled for it
(`<service>-<member>`, `llmkube.ai/fleet-member`), so kube-proxy and
LLMKube's controller see every replica behind the one ClusterIP. The
differences from the single-Mac `Registrar` are all about sharing:

- a slice says ready only while this Mac holds a replica Lease (or is the
  named successor of a draining Mac's replica): a Mac that
  cannot renew stops announcing itself, even from a heartbeat already in
  flight, and a returning Mac never re-announces what moved;
- the Service is shared: it is deleted only with its InferenceService, and
  then only by the last Mac whose slice is gone;
- start-up cleanup touches this Mac's slices only (and the `-metal` slice
  this Mac wrote before joining the fleet, recognised by its address);
- a member that sees another Mac's Lease expire marks that Mac's slices not
  ready at once, before anyone starts a replacement.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Callable, Iterable

import structlog
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.adapters.kube.registrar import MANAGED_SELECTOR, Registrar
from metal_agent.core.registration import FLEET_MEMBER_LABEL, ISVC_LABEL, SERVICE_NAME_LABEL, Registration, service_name
from metal_agent.tasks import within

log = structlog.get_logger(__name__)


class FleetRegistrar(Registrar):
    def __init__(self, api, *, agent_version: str, member: str, holds: Callable[[str], bool],
                 exists: Callable[[str], bool], address: Callable[[], str | None], stop_timeout: float = 2.0,
                 **kwargs) -> None:
        super().__init__(api, agent_version=agent_version, **kwargs)
        self.member = member
        # "namespace/name" -> may this Mac serve it right now (it holds a replica, or starts one
        # a draining Mac hands over: make before break), with its own Lease renewed in time?
        self.holds = holds
        self.exists = exists  # is the InferenceService still in the cluster?
        self.address = address  # this Mac's registered address
        self.stop_timeout = stop_timeout

    async def ensure(self, reg: Registration) -> bool:
        return await super().ensure(replace(reg, member=self.member))

    async def _apply(self, key: str, reg: Registration) -> None:
        if reg.ready and not self.holds(key):
            reg = replace(reg, ready=False)  # the Lease is gone or lapsing: never announce a replica we do not hold
        await super()._apply(key, reg)

    def announced(self, key: str) -> bool:
        """Our slice for `key` was last written saying ready."""
        reg = self._applied.get(key)
        return reg is not None and reg.ready

    async def mark_not_ready(self, namespace: str, isvc_name: str) -> None:
        """Bounded: the stop that follows must not wait out an unreachable API (a partitioned
        Mac has to stop before another may take its replica); the other members mark this
        Mac's slice not ready when its Lease expires."""
        try:
            await within(super().mark_not_ready(namespace, isvc_name), self.stop_timeout)
        except asyncio.TimeoutError:
            log.warning("could not mark the slice not ready in time; stopping anyway",
                        service=f"{namespace}/{isvc_name}")

    async def remove(self, namespace: str, isvc_name: str) -> None:
        """Withdraw this Mac's slice; the shared Service goes only with its InferenceService,
        when no other Mac's slice remains."""
        await self.withdraw(namespace, isvc_name)
        if self.exists(f"{namespace}/{isvc_name}"):
            return
        if await self._other_slices(namespace, isvc_name):
            return
        await super().remove(namespace, isvc_name)

    async def _other_slices(self, namespace: str, isvc_name: str) -> list:
        listing = await self.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"{SERVICE_NAME_LABEL}={service_name(isvc_name)}")
        return [s for s in listing.items if (s.metadata.labels or {}).get(FLEET_MEMBER_LABEL) != self.member]

    async def cleanup(self, namespaces: Iterable[str] | None, keep_service: Callable[[str, str], bool],
                      keep_slice: Callable[[str, str], bool]) -> int:
        """This Mac's slices that it no longer serves, and the Services of deleted InferenceServices."""
        deleted = 0
        mine = f"{MANAGED_SELECTOR},{FLEET_MEMBER_LABEL}={self.member}"
        address = self.address()
        for ns in (list(namespaces) if namespaces else [None]):
            for selector, single_mac in ((mine, False), (f"{MANAGED_SELECTOR},!{FLEET_MEMBER_LABEL}", True)):
                listing = await (self.discovery.list_endpoint_slice_for_all_namespaces(label_selector=selector)
                                 if ns is None else self.discovery.list_namespaced_endpoint_slice(ns, label_selector=selector))
                for obj in listing.items:
                    meta = obj.metadata
                    isvc = (meta.labels or {}).get(ISVC_LABEL, "")
                    if single_mac and not any(address in (e.addresses or []) for e in obj.endpoints or []):
                        continue  # another Mac's slice from before the fleet: not ours to judge
                    if isvc and not single_mac and keep_slice(meta.namespace, isvc) and self.holds(f"{meta.namespace}/{isvc}"):
                        continue
                    await self._delete(self.discovery.delete_namespaced_endpoint_slice, meta)
                    self._applied.pop(f"{meta.namespace}/{isvc}", None)
                    deleted += 1
            services = await (self.core.list_service_for_all_namespaces(label_selector=MANAGED_SELECTOR) if ns is None
                              else self.core.list_namespaced_service(ns, label_selector=MANAGED_SELECTOR))
            for svc in services.items:
                isvc = (svc.metadata.labels or {}).get(ISVC_LABEL, "")
                if isvc and (self.exists(f"{svc.metadata.namespace}/{isvc}")
                             or await self._other_slices(svc.metadata.namespace, isvc)):
                    continue
                await self._delete(self.core.delete_namespaced_service, svc.metadata)
                deleted += 1
        return deleted

    async def mark_member_not_ready(self, dead: str, namespaces: Iterable[str] | None) -> int:
        """Another Mac stopped renewing: its slices say not ready now, before a replacement
        starts, so clients never see more ready endpoints than replicas. Returns slices changed."""
        changed = 0
        selector = f"{MANAGED_SELECTOR},{FLEET_MEMBER_LABEL}={dead}"
        for ns in (list(namespaces) if namespaces else [None]):
            listing = await (self.discovery.list_endpoint_slice_for_all_namespaces(label_selector=selector)
                             if ns is None else self.discovery.list_namespaced_endpoint_slice(ns, label_selector=selector))
            for obj in listing.items:
                endpoints = [{"addresses": e.addresses, "conditions": {"ready": False, "serving": False, "terminating": True}}
                             for e in obj.endpoints or []]
                if not any((e.conditions and e.conditions.ready) for e in obj.endpoints or []):
                    continue
                try:
                    await self.discovery.patch_namespaced_endpoint_slice(
                        obj.metadata.name, obj.metadata.namespace,
                        {"metadata": {"resourceVersion": obj.metadata.resource_version}, "endpoints": endpoints},
                        _content_type="application/merge-patch+json")
                    changed += 1
                except ApiException as err:
                    if err.status not in (404, 409):  # gone, or its Mac came back and wrote it: fine
                        raise
        return changed
