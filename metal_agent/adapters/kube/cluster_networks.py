"""Where the cluster calls from: every Node's addresses and pod CIDRs, read from the API and kept current.

The front door lets the cluster in without a credential (core/access.py). A
request from a pod reaches the Mac either from the pod's own address (routed
pod networks: `spec.podCIDRs`) or masqueraded to its Node's address (most
CNIs, for destinations off the cluster): so both, every Node's `InternalIP`
and `ExternalIP` as a /32 or /128, and each `spec.podCIDRs` entry. A Node
added, re-addressed or deleted changes the set within a watch event.

Without permission to list Nodes (an older ClusterRole), this says so once,
clearly, and the front door falls back to the networks the owner listed; it
tries again now and then, quietly, so a role granted later takes effect.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Callable

import structlog
from kubernetes_asyncio import client

from metal_agent.adapters.kube.informer import BuiltinInformer, object_key

log = structlog.get_logger(__name__)

ADDRESS_TYPES = frozenset({"InternalIP", "ExternalIP"})
FORBIDDEN_RETRY_S = 300.0


def node_networks(node: dict) -> frozenset[str]:
    """A Node's addresses (as host networks) and pod CIDRs; anything unparsable is skipped."""
    found: set[str] = set()
    spec = node.get("spec") or {}
    cidrs = list(spec.get("podCIDRs") or [])
    if spec.get("podCIDR"):
        cidrs.append(spec["podCIDR"])
    for cidr in cidrs:
        try:
            found.add(str(ipaddress.ip_network(str(cidr), strict=False)))
        except ValueError:
            continue
    for entry in (node.get("status") or {}).get("addresses") or []:
        if isinstance(entry, dict) and entry.get("type") in ADDRESS_TYPES:
            try:
                found.add(str(ipaddress.ip_network(str(entry.get("address", "")))))  # a bare address: /32, /128
            except ValueError:
                continue
    return frozenset(found)


def _slim(node: dict) -> dict:
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    return {"metadata": {k: meta[k] for k in ("name", "resourceVersion", "uid") if k in meta},
            "spec": {k: spec[k] for k in ("podCIDR", "podCIDRs") if k in spec},
            "status": {"addresses": (node.get("status") or {}).get("addresses") or []}}


class _NodeInformer(BuiltinInformer):
    def __init__(self, owner: "ClusterNetworks", *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    async def _relist(self, scope: str | None) -> str:
        version = await super()._relist(scope)
        self._owner.listed()
        return version

    async def _failed(self, scope: str | None, error: str) -> None:
        if self.last_status != 403:
            return await super()._failed(scope, error)
        # Forget what we saw: once permitted again, a full relist lets every Node back in.
        self.cache.clear()
        self._resume.clear()
        self._owner.forbidden()
        await asyncio.sleep(self._owner.forbidden_retry)  # a role granted later takes effect


class ClusterNetworks:
    """The cluster's networks (`networks()`), calling `on_change()` whenever the set changes."""

    def __init__(self, api: client.ApiClient, on_change: Callable[[], None] = lambda: None, *,
                 forbidden_retry: float = FORBIDDEN_RETRY_S, watch_timeout: float = 300.0) -> None:
        core = client.CoreV1Api(api)
        self.on_change = on_change
        self.forbidden_retry = forbidden_retry
        self.permitted: bool | None = None  # None: not known yet; False: may not list Nodes
        self.refusals = 0  # lists refused (403) so far
        self._per_node: dict[str, frozenset[str]] = {}
        self._networks: tuple[str, ...] = ()
        self.informer = _NodeInformer(self, api, lambda scope, **kw: core.list_node(**kw), "nodes",
                                      self._node_changed, slim=_slim, watch_timeout=watch_timeout)
        self.synced = self.informer.synced

    def networks(self) -> tuple[str, ...]:
        return self._networks

    async def run(self) -> None:
        await self.informer.run()

    def forbidden(self) -> None:
        self.refusals += 1
        if self.permitted is not False:
            log.warning("may not list Nodes: the front door lets in only loopback and the networks given with "
                        "--front-door-allow-network (plus API keys and cluster tokens); grant `list` and `watch` "
                        "on nodes (manifests/rbac/metal-agent.yaml) to let the cluster's Nodes and pods in")
        self.permitted = False
        if self._per_node:
            self._per_node.clear()  # what we can no longer watch we cannot vouch for
            self._update()

    def listed(self) -> None:
        if self.permitted is False:
            log.info("may list Nodes again: the cluster's Nodes and pods are let in")
        self.permitted = True

    def _node_changed(self, old: dict | None, new: dict | None) -> None:
        key = object_key(new or old)
        found = node_networks(new) if new is not None else frozenset()
        if self._per_node.get(key, frozenset()) == found:
            return
        if found:
            self._per_node[key] = found
        else:
            self._per_node.pop(key, None)
        self._update()

    def _update(self) -> None:
        networks = tuple(sorted(set().union(*self._per_node.values())))
        if networks != self._networks:
            self._networks = networks
            self.on_change()
