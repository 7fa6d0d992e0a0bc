"""Kubernetes helpers for tests: clients per identity, apply manifests, namespaces."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterable

import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.dynamic import DynamicClient

from tests.support.wait import wait_for

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
OUR_CRDS = ("models.inference.llmkube.dev", "inferenceservices.inference.llmkube.dev")

FIELD_MANAGER = "metal-agent-tests"


async def api_client(kubeconfig: Path) -> client.ApiClient:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


@contextlib.asynccontextmanager
async def api_client_for(kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    api = await api_client(kubeconfig)
    try:
        yield api
    finally:
        await api.close()


def load_documents(paths: Iterable[Path]) -> list[dict]:
    docs: list[dict] = []
    for path in paths:
        files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
        for f in files:
            if f.name == "kustomization.yaml":
                continue
            docs.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    return docs


async def apply(api: client.ApiClient, docs: Iterable[dict], namespace: str | None = None) -> None:
    """Server-side apply each document, as `kubectl apply --server-side` would."""
    dyn = await DynamicClient(api)
    for doc in docs:
        resource = await dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        ns = doc.get("metadata", {}).get("namespace") or (namespace if resource.namespaced else None)
        await dyn.server_side_apply(
            resource, body=doc, name=doc["metadata"]["name"], namespace=ns,
            field_manager=FIELD_MANAGER, force_conflicts=True,
        )


async def wait_crds_established(api: client.ApiClient, names: Iterable[str], timeout: float = 60) -> None:
    ext = client.ApiextensionsV1Api(api)

    async def established(name: str) -> bool:
        crd = await ext.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    for name in names:
        await wait_for(lambda n=name: established(n), timeout=timeout, what=f"CRD {name} Established")
        # Established is not the end: the resource's storage may still answer
        # 429 "storage is (re)initializing" for a moment. Wait until a list works.
        plural, group = name.split(".", 1)
        crd = await ext.read_custom_resource_definition(name)
        version = crd.spec.versions[0].name

        async def listable(g=group, v=version, p=plural) -> bool:
            try:
                await client.CustomObjectsApi(api).list_cluster_custom_object(g, v, p, limit=1)
                return True
            except ApiException as err:
                if err.status == 429:
                    return False
                raise

        await wait_for(listable, timeout=timeout, what=f"{name} storage ready")


async def create_namespace(api: client.ApiClient, prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


async def delete_namespace(api: client.ApiClient, name: str) -> None:
    # No namespace controller runs in the test control plane, so the namespace
    # stays Terminating; its name is unique, so nothing else ever reuses it.
    with contextlib.suppress(ApiException):
        await client.CoreV1Api(api).delete_namespace(name)


async def install_metal_agent(admin: client.ApiClient) -> None:
    """What every control plane of the tests, benches and demo needs: our CRDs (established,
    so objects of their kinds can be created at once) and the agent's least-privilege role."""
    await apply(admin, load_documents([MANIFESTS / "crds"]))
    await wait_crds_established(admin, OUR_CRDS)
    await apply(admin, load_documents([MANIFESTS / "rbac" / "metal-agent.yaml"]))


async def service_account_token(admin: client.ApiClient, namespace: str, name: str, *, create: bool = False) -> str:
    """A one-hour token of ServiceAccount `namespace/name` (created first with `create`)."""
    core = client.CoreV1Api(admin)
    if create:
        await core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    request = await core.create_namespaced_service_account_token(
        name, namespace, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                          "spec": {"expirationSeconds": 3600}})
    return request.status.token


async def grant_monitoring(admin: client.ApiClient, namespace: str, binding: str, account: str = "prometheus") -> None:
    """Bind the shipped monitoring ClusterRole (manifests/monitoring/prometheus-rbac.yaml: `get /metrics`)
    to ServiceAccount `namespace/account` under ClusterRoleBinding `binding`, as a cluster's owner would."""
    (role,) = [d for d in yaml.safe_load_all((MANIFESTS / "monitoring" / "prometheus-rbac.yaml").read_text())
               if d and d["kind"] == "ClusterRole"]
    await apply(admin, [role])
    await client.RbacAuthorizationV1Api(admin).create_cluster_role_binding({
        "metadata": {"name": binding},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]})
