"""Writes and deletes that only ever touch objects the agent owns.

A namespace user picks the InferenceService's name, and with it the name of
the Service and EndpointSlice the agent writes. A forced server-side apply
would take over whatever already has that name (its labels, ports and
owners, and its traffic through our slice). So:

- an object is looked at before the agent first writes it (a list by name,
  which also says at which resourceVersion the cluster was when it was not
  there); one that exists and is not ours (the caller's `ours` rule) raises
  `NameTaken` and is left exactly as it was;
- every apply carries a resourceVersion as a precondition: that of our object
  as the agent last wrote or checked it, or, for an absent one, the list's.
  The API server checks it and writes in one step (an etcd transaction): if
  anyone made, replaced or changed the object since, the apply fails with 409
  instead of writing, and the agent looks again. An absent object is created
  by that same apply (create-if-absent without a separate POST, so every field
  is owned by our apply and a later apply can still drop one). The steady
  state (a heartbeat) costs the same one call as before; only someone else's
  write costs a look;
- a delete checks `ours` and carries the uid *and* resourceVersion it checked,
  so an object relabelled or replaced after the check is not deleted.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = structlog.get_logger(__name__)

FIELD_MANAGER = "metal-agent"
APPLY = "application/apply-patch+yaml"

Ours = Callable[[Any], bool]  # the object's V1ObjectMeta -> may we write/delete it


class NameTaken(Exception):
    """An object of the name we need exists and belongs to someone else."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        super().__init__(f"{kind} {namespace}/{name} exists and is not ours")
        self.kind, self.namespace, self.name = kind, namespace, name


class OwnedObjects:
    """Guarded apply/delete of one kind of namespaced object (Service, EndpointSlice)."""

    def __init__(self, kind: str, *, read: Callable[..., Awaitable], listing: Callable[..., Awaitable],
                 patch: Callable[..., Awaitable], delete: Callable[..., Awaitable]) -> None:
        self.kind = kind
        self._read, self._list, self._patch, self._delete = read, listing, patch, delete
        # (namespace, name, claimant) -> resourceVersion of the object as this claimant last wrote
        # or judged it. Per claimant: two InferenceServices can derive one name (`a.b`, `a-b`), and
        # one's object is not the other's.
        self._seen: dict[tuple[str, str, str], str] = {}

    async def apply(self, namespace: str, name: str, body: dict, ours: Ours, claimant: str = "") -> None:
        """Server-side apply `body` (forced: we repair edits to our own object), only over an
        object `ours` accepts or where none exists. `claimant` names whose `ours` it is."""
        key = (namespace, name, claimant)
        version = self._seen.get(key) or await self._look(namespace, name, ours)
        try:
            written = await self._apply_at(namespace, name, body, version)
        except ApiException as err:
            if err.status not in (404, 409):
                raise
            # Made, changed or replaced since we last saw it: look again before writing.
            self._seen.pop(key, None)
            written = await self._apply_at(namespace, name, body, await self._look(namespace, name, ours))
        self._seen[key] = written.metadata.resource_version

    async def _apply_at(self, namespace: str, name: str, body: dict, version: str):
        guarded = {**body, "metadata": {**body["metadata"], "resourceVersion": version}}
        return await self._patch(name, namespace, guarded, field_manager=FIELD_MANAGER, force=True,
                                 _content_type=APPLY)

    async def _look(self, namespace: str, name: str, ours: Ours) -> str:
        """The resourceVersion to apply at: our object's, or the cluster's when none of that
        name existed (an apply at it creates the object only if still none exists). Raises
        NameTaken for someone else's object."""
        found = await self._list(namespace, field_selector=f"metadata.name={name}")
        if not found.items:
            return found.metadata.resource_version
        current = found.items[0]
        if not ours(current.metadata):
            raise NameTaken(self.kind, namespace, name)
        return current.metadata.resource_version

    def forget(self, namespace: str, name: str) -> None:
        for key in [k for k in self._seen if k[:2] == (namespace, name)]:
            del self._seen[key]

    async def delete(self, namespace: str, name: str, ours: Ours, *, quiet: bool = False) -> bool:
        """Delete the object if it is ours, exactly as checked (uid and resourceVersion). True if deleted.
        `quiet`: a refusal is expected (a retry already reported) and logged at debug only."""
        self.forget(namespace, name)
        try:
            current = await self._read(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        if not ours(current.metadata):
            (log.debug if quiet else log.warning)("not deleting an object we do not manage", kind=self.kind,
                                                  name=f"{namespace}/{name}")
            return False
        return await delete_exactly(self._delete, current.metadata)


async def delete_exactly(deleter: Callable[..., Awaitable], meta) -> bool:
    """Delete the object `meta` describes, only if it is still that object at that version.
    404 (gone) and 409 (changed since: judged again next time) are not errors."""
    try:
        await deleter(meta.name, meta.namespace, body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=meta.uid, resource_version=meta.resource_version)))
        return True
    except ApiException as err:
        if err.status not in (404, 409):
            raise
        return False


def owned_services(core: client.CoreV1Api) -> OwnedObjects:
    """Guarded writes of Services through `core`."""
    return OwnedObjects("Service", read=core.read_namespaced_service, listing=core.list_namespaced_service,
                        patch=core.patch_namespaced_service, delete=core.delete_namespaced_service)


def owned_slices(discovery: client.DiscoveryV1Api) -> OwnedObjects:
    """Guarded writes of EndpointSlices through `discovery`."""
    return OwnedObjects("EndpointSlice", read=discovery.read_namespaced_endpoint_slice,
                        listing=discovery.list_namespaced_endpoint_slice,
                        patch=discovery.patch_namespaced_endpoint_slice,
                        delete=discovery.delete_namespaced_endpoint_slice)


def owner_uids(meta) -> list[str]:
    return [ref.uid for ref in meta.owner_references or []]
