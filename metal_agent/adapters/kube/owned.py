"""Writes and deletes that only ever touch objects the agent owns.

A namespace user picks the InferenceService's name, and with it the name of
the Service and EndpointSlice the agent writes. A forced server-side apply
would take over whatever already has that name (its labels, ports and
owners, and its traffic through our slice). So:

- an object is looked at (GET) before the agent first writes it; one that
  exists and is not ours (the caller's `ours` rule) raises `NotOurs` and is
  left exactly as it was;
- an absent object is made with a plain create, which fails if someone made
  one meanwhile (create-if-absent): the loser looks again, so the race between
  the look and the write never ends in a takeover;
- every later apply carries the resourceVersion the agent last wrote or
  checked, as a precondition: if anyone replaced or changed the object since,
  the apply fails with 409 instead of writing, and the agent looks again. The
  steady state (a heartbeat) costs the same one call as before; only a change
  by someone else costs a GET.
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


class NotOurs(Exception):
    """An object of the name we need exists and belongs to someone else."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        super().__init__(f"{kind} {namespace}/{name} exists and is not ours")
        self.kind, self.namespace, self.name = kind, namespace, name


class OwnedObjects:
    """Guarded apply/delete of one kind of namespaced object (Service, EndpointSlice)."""

    def __init__(self, kind: str, *, read: Callable[..., Awaitable], create: Callable[..., Awaitable],
                 patch: Callable[..., Awaitable], delete: Callable[..., Awaitable]) -> None:
        self.kind = kind
        self._read, self._create, self._patch, self._delete = read, create, patch, delete
        # (namespace, name) -> resourceVersion of our object as we last wrote or checked it
        self._seen: dict[tuple[str, str], str] = {}

    async def apply(self, namespace: str, name: str, body: dict, ours: Ours) -> None:
        """Server-side apply `body` (forced: we repair edits to our own object), only over our object."""
        key = (namespace, name)
        version = self._seen.get(key)
        if version is None and (version := await self._claim(namespace, name, body, ours)) is None:
            return  # just created from `body`
        try:
            written = await self._apply_at(namespace, name, body, version)
        except ApiException as err:
            if err.status not in (404, 409):
                raise
            # Changed, replaced or deleted since we last saw it: look again before writing.
            self._seen.pop(key, None)
            if (version := await self._claim(namespace, name, body, ours)) is None:
                return
            written = await self._apply_at(namespace, name, body, version)
        self._seen[key] = written.metadata.resource_version

    async def _apply_at(self, namespace: str, name: str, body: dict, version: str):
        guarded = {**body, "metadata": {**body["metadata"], "resourceVersion": version}}
        return await self._patch(name, namespace, guarded, field_manager=FIELD_MANAGER, force=True,
                                 _content_type=APPLY)

    async def _claim(self, namespace: str, name: str, body: dict, ours: Ours) -> str | None:
        """The resourceVersion of our existing object; None after creating it; NotOurs otherwise."""
        key = (namespace, name)
        for attempt in range(2):
            try:
                current = await self._read(name, namespace)
            except ApiException as err:
                if err.status != 404:
                    raise
                try:
                    created = await self._create(namespace, body, field_manager=FIELD_MANAGER)
                except ApiException as err:
                    if err.status == 409 and attempt == 0:
                        continue  # someone made one between our look and our create: look at theirs
                    raise
                self._seen[key] = created.metadata.resource_version
                return None
            if not ours(current.metadata):
                raise NotOurs(self.kind, namespace, name)
            return current.metadata.resource_version
        raise AssertionError("unreachable")  # pragma: no cover

    def forget(self, namespace: str, name: str) -> None:
        self._seen.pop((namespace, name), None)

    async def delete(self, namespace: str, name: str, ours: Ours) -> bool:
        """Delete the object if it is ours, exactly as checked (uid and resourceVersion). True if deleted."""
        self.forget(namespace, name)
        try:
            current = await self._read(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        if not ours(current.metadata):
            log.warning("not deleting an object we do not manage", kind=self.kind, name=f"{namespace}/{name}")
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


def owner_uids(meta) -> list[str]:
    return [ref.uid for ref in meta.owner_references or []]
