"""Apply the agent's InferenceService status fields with server-side apply.

Server-side apply under the field manager `metal-agent` is what lets two
writers share one status: the API server records which fields are ours,
keeps everything else as its other writers (LLMKube's controller) left it,
merges `conditions` by type, and removes a field of ours only when we stop
applying it. No read-modify-write, so a stale cache can never clobber another
writer's conditions.

Writes happen only when the agent's *intent* changes, never because the
object changed around it: every write wakes every watcher (LLMKube's
controller answers each with a write of its own), so an agent that re-applied
on every event would keep the controller busy for ever. After a restart,
when there is no remembered intent, the object itself decides: the apply is
skipped when the fields we own there already say exactly what we intend.
"""

from __future__ import annotations

import datetime as dt

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.names import GROUP, ISVC_PLURAL, VERSION
from metal_agent.core.status_owner import FIELD_MANAGER

log = structlog.get_logger(__name__)

APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON
MERGE_PATCH = "application/merge-patch+json"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _owned_paths(raw: dict) -> set[str] | None:
    """Top-level status fields (and condition types) `metal-agent` owns on the server, or None if it owns none."""
    for entry in (raw.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("subresource") == "status" \
                and entry.get("operation") == "Apply":
            fields = (entry.get("fieldsV1") or {}).get("f:status") or {}
            owned = {k[2:] for k in fields if k.startswith("f:")}
            for key in (fields.get("f:conditions") or {}):
                if key.startswith("k:"):
                    owned.add("conditions:" + key)
            return owned
    return None


def _intent_paths(intent: dict) -> set[str]:
    owned = set(intent)
    for cond in intent.get("conditions") or []:
        owned.add('conditions:k:{"type":"' + cond["type"] + '"}')
    return owned


def already_applied(raw: dict, intent: dict, *, stamped: tuple[str, ...] = ()) -> bool:
    """True when the server already holds exactly `intent` under our field manager.

    Needs the object's managedFields (the informer keeps the status entries).
    `stamped` fields (lastUpdated) are ours but their value does not matter.
    """
    owned = _owned_paths(raw)
    if owned is None:
        return not intent
    if owned - set(stamped) != _intent_paths(intent):
        return False
    live = raw.get("status") or {}
    for field, value in intent.items():
        if field == "conditions":
            by_type = {c.get("type"): c for c in live.get("conditions") or [] if isinstance(c, dict)}
            for cond in value:
                have = by_type.get(cond["type"]) or {}
                if any(have.get(k) != v for k, v in cond.items()):
                    return False
        elif live.get(field) != value:
            return False
    return True


class StatusWriter:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = client.CustomObjectsApi(api)

    async def apply(self, namespace: str, name: str, status: dict) -> dict | None:
        """Apply `status` as the complete set of our status fields; the server's object, or None if it is gone.

        `force`: a field we apply was last set by another writer's update (e.g.
        LLMKube's controller rewrote the scheduling fields): taking it back is
        the point of applying it, and happens only when our intent changed.
        """
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
                "metadata": {"name": name, "namespace": namespace}, "status": status}
        try:
            return await self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, ISVC_PLURAL, name, body,
                field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH,
            )
        except ApiException as err:
            if err.status == 404:  # deleted meanwhile: nothing to report on
                return None
            raise

    async def clear(self, namespace: str, name: str, fields: tuple[str, ...], resource_version: str) -> bool:
        """Remove status fields another writer set and nobody will clear (see `stale_scheduling`).

        A merge patch, as LLMKube's Go agent clears them: apply can only give up
        fields we own. The resourceVersion makes it a no-op if the object moved on.
        """
        body = {"metadata": {"resourceVersion": resource_version}, "status": {f: None for f in fields}}
        try:
            await self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, ISVC_PLURAL, name, body,
                field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH,
            )
        except ApiException as err:
            if err.status in (404, 409):  # gone, or changed meanwhile: the next reconcile decides again
                return False
            raise
        return True
