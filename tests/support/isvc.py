"""Create, read and wait on Models and InferenceServices in tests (admin identity)."""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from tests.support.wait import wait_for

GROUP, VERSION = "inference.llmkube.dev", "v1alpha1"
MERGE_PATCH = "application/merge-patch+json"


class Cluster:
    """Thin helpers over the admin client for one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.api = api
        self.ns = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    async def create_model(self, name: str, source: str, accelerator: str = "metal", **spec: Any) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Model", "metadata": {"name": name},
                "spec": {"source": source, "hardware": {"accelerator": accelerator}, **spec}}
        return await self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, "models", body)

    async def create_isvc(self, name: str, model: str, **spec: Any) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": name},
                "spec": {"modelRef": model, **spec}}
        return await self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, "inferenceservices", body)

    async def patch_isvc(self, name: str, spec: dict) -> dict:
        return await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.ns, "inferenceservices", name, {"spec": spec}, _content_type=MERGE_PATCH)

    async def patch_model(self, name: str, spec: dict) -> dict:
        return await self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, "models", name, {"spec": spec}, _content_type=MERGE_PATCH)

    async def delete_isvc(self, name: str) -> None:
        await self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, "inferenceservices", name)

    async def isvc(self, name: str) -> dict | None:
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, "inferenceservices", name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    async def status(self, name: str) -> dict:
        obj = await self.isvc(name)
        return (obj or {}).get("status") or {}

    async def condition(self, name: str, ctype: str) -> dict | None:
        for cond in (await self.status(name)).get("conditions") or []:
            if cond["type"] == ctype:
                return cond
        return None

    async def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict:
        async def check():
            status = await self.status(name)
            return status if status.get("phase") == phase else None
        return await wait_for(check, timeout=timeout, what=f"{self.ns}/{name} phase {phase}",
                              on_timeout=lambda: f"namespace {self.ns}")

    async def events(self, name: str) -> list[client.CoreV1Event]:
        result = await self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}")
        return sorted(result.items, key=lambda e: (e.first_timestamp or e.event_time or 0, e.metadata.name))

    async def event_reasons(self, name: str) -> list[str]:
        return [e.reason for e in await self.events(name) for _ in range(e.count or 1)]

    async def wait_event(self, name: str, reason: str, count: int = 1, timeout: float = 15) -> list[str]:
        """Events are sent in the background, after the state change they report: wait for them."""
        async def enough():
            reasons = await self.event_reasons(name)
            return reasons if reasons.count(reason) >= count else None
        return await wait_for(enough, timeout=timeout, what=f"{count} {reason} Event(s) on {self.ns}/{name}")
