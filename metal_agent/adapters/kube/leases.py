"""coordination.k8s.io Leases in the fleet namespace: the few calls the fleet makes.

Every write that decides who serves a replica is an update carrying the
resourceVersion the decision was made on (or a create, for a Lease nobody
made yet), so the API server picks exactly one winner among Macs bidding at
once: the others get 409 Conflict, which is an answer, not an error.
Calls get a short timeout of their own: a renewal that cannot reach the API
must fail in time for the Mac to fence itself, not after the client's 20 s.
"""

from __future__ import annotations

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.leases import COORDINATION

GROUP, VERSION, PLURAL = COORDINATION


class LeaseClient:
    def __init__(self, api: client.ApiClient, namespace: str, *, timeout: float = 5.0) -> None:
        self.api = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.timeout = timeout

    async def put(self, body: dict, resource_version: str | None) -> dict:
        """Write our own Lease: an update at `resource_version` (Leases refuse an update without
        one), re-read once if someone else wrote it meanwhile; created if it does not exist."""
        name = body["metadata"]["name"]
        for _ in range(2):
            if resource_version is None:
                resource_version = await self.resource_version(name)
                if resource_version is None:
                    return await self.create(body)
            body["metadata"]["resourceVersion"] = resource_version
            try:
                return await self.api.replace_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                                       body, _request_timeout=self.timeout)
            except ApiException as err:
                if err.status not in (404, 409):
                    raise
                resource_version = None
        raise ApiException(status=409, reason=f"Lease {name} keeps changing under us")

    async def create(self, body: dict) -> dict:
        return await self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body,
                                                              _request_timeout=self.timeout)

    async def swap(self, body: dict) -> dict | None:
        """Create (no resourceVersion) or update (with one) only if nobody got there first:
        the Lease as written, or None when another write won."""
        try:
            if body["metadata"].get("resourceVersion"):
                return await self.api.replace_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                       body["metadata"]["name"], body,
                                                                       _request_timeout=self.timeout)
            return await self.create(body)
        except ApiException as err:
            if err.status in (404, 409):
                return None
            raise

    async def resource_version(self, name: str) -> str | None:
        """The Lease's current resourceVersion straight from the API (None: it is gone)."""
        try:
            obj = await self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                              _request_timeout=self.timeout)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return (obj.get("metadata") or {}).get("resourceVersion")

    async def list(self, label_selector: str) -> list[dict]:
        listing = await self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                               label_selector=label_selector,
                                                               _request_timeout=self.timeout)
        return listing.get("items") or []

    async def delete(self, name: str, resource_version: str) -> None:
        try:
            await self.api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=self.timeout,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=resource_version)))
        except ApiException as err:
            if err.status not in (404, 409):
                raise
