"""Write InferenceService status through the status subresource, only when it changed.

Every write wakes every watcher of the object (LLMKube's controller, kubectl
-w, our own informer), so an unchanged status is never written. The
comparison ignores `lastUpdated`, which is stamped on real changes only.
Merge patches carry no resourceVersion, so concurrent writers of *other*
status fields (LLMKube's controller) do not conflict with us; fields we own
and no longer want are removed explicitly with nulls.
"""

from __future__ import annotations

import datetime as dt

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.names import GROUP, ISVC_PLURAL, VERSION

log = structlog.get_logger(__name__)

MERGE_PATCH = "application/merge-patch+json"  # the client would pick strategic merge, which CRDs refuse

OWNED_FIELDS = (
    "phase", "readyReplicas", "replicas", "desiredReplicas", "conditions", "observedGeneration",
    "endpoint", "specHash", "acceleration", "schedulingStatus", "schedulingMessage",
)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def status_patch(live_status: dict | None, wanted: dict) -> dict | None:
    """The merge patch turning `live_status` into `wanted` for our fields, or None if equal."""
    live = live_status or {}
    patch = {}
    for field in OWNED_FIELDS:
        if field in wanted:
            if live.get(field) != wanted[field]:
                patch[field] = wanted[field]
        elif live.get(field) is not None:
            patch[field] = None
    return patch or None


class StatusWriter:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = client.CustomObjectsApi(api)

    async def write(self, namespace: str, name: str, live_status: dict | None, wanted: dict) -> bool:
        """Patch the status if it differs; True when a write happened. Raises ApiException on failure."""
        patch = status_patch(live_status, wanted)
        if patch is None:
            return False
        patch["lastUpdated"] = utc_now()
        try:
            await self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, ISVC_PLURAL, name, {"status": patch},
                _content_type=MERGE_PATCH,
            )
        except ApiException as err:
            if err.status == 404:  # deleted meanwhile: nothing to report on
                return False
            raise
        return True
