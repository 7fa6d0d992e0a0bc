"""doctor's checks of the cluster: the API answers, serves the CRDs, grants the agent's
permissions, and who writes the services' status.

Asked with the kubeconfig the agent will use (its identity), never
rewriting it; CRDs through discovery and permissions through
SelfSubjectAccessReview, which any authenticated identity may ask.
"""

from __future__ import annotations

import asyncio
import os
from typing import Sequence

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.cli.doctor_base import CheckResult, Status, fail, ok, skip
from metal_agent.core.claim import evaluate, wanted_model
from metal_agent.core.names import GROUP, ISVC_PLURAL, MODEL_PLURAL, VERSION
from metal_agent.core.permissions import AGENT_PERMISSIONS, FLEET_PERMISSIONS, Permission
from metal_agent.core.result import NotOurs
from metal_agent.core.status_owner import StatusMode, decide, shows_controller

API_TIMEOUT_S = 10.0
RBAC_FIX = (
    "kubectl apply -f manifests/rbac/metal-agent.yaml (from the metal-agent checkout) and make sure the "
    "kubeconfig's identity is bound to it (ServiceAccount metal-agent/metal-agent or user metal-agent)"
)


async def _load_api(kubeconfig: str | None, context: str | None) -> client.ApiClient:
    configuration = client.Configuration()
    # persist_config=False: a doctor must not rewrite the user's kubeconfig (token refresh).
    await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration,
                                  persist_config=False)
    return client.ApiClient(configuration)


async def check_kube(api: client.ApiClient) -> CheckResult:
    name = "Kubernetes API"
    host = api.configuration.host
    try:
        info = await client.VersionApi(api).get_code(_request_timeout=API_TIMEOUT_S)
    except ApiException as exc:
        return fail(name, f"{host} answered {exc.status} {exc.reason}",
                    "the kubeconfig's credentials are not accepted: renew the token or certificate")
    except Exception as exc:  # noqa: BLE001 - connection, TLS and timeout errors all mean "no answer"
        return fail(name, f"no answer from {host}: {type(exc).__name__}: {exc}",
                    "check the server address in the kubeconfig (--kubeconfig, --context) and that this Mac "
                    "can reach it (VPN, firewall)")
    return ok(name, f"{host} answers (Kubernetes {info.git_version})")


async def check_crds(api: client.ApiClient) -> CheckResult:
    """Asked through discovery, which every authenticated identity may read.

    Reading the CustomResourceDefinition objects themselves would need
    apiextensions access the least-privilege agent role does not have, and
    discovery answers the real question: does the server serve the version
    the agent speaks.
    """
    name = "CRDs"
    group_version = f"{GROUP}/{VERSION}"
    fix = f"install LLMKube, or this checkout's CRDs: kubectl apply -k manifests/ (serves {group_version})"
    try:
        listing = await client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION, _request_timeout=API_TIMEOUT_S)
    except ApiException as exc:
        if exc.status == 404:
            return fail(name, f"the API server does not serve {group_version}", fix)
        return fail(name, f"discovery of {group_version} failed: {exc.status} {exc.reason}", fix)
    except Exception as exc:  # noqa: BLE001
        return fail(name, f"discovery of {group_version} failed: {type(exc).__name__}: {exc}", fix)
    served = {r.name for r in listing.resources or ()}
    missing = [p for p in (MODEL_PLURAL, ISVC_PLURAL) if p not in served]
    if missing:
        return fail(name, f"{group_version} does not serve {', '.join(missing)}", fix)
    return ok(name, f"{MODEL_PLURAL}.{GROUP} and {ISVC_PLURAL}.{GROUP} served at {VERSION}")


async def _allowed(api: client.ApiClient, perm: Permission, namespace: str) -> bool:
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(
            verb=perm.verb, group=perm.group, resource=perm.resource, subresource=perm.subresource or None,
            namespace=namespace or None,
        )
    ))
    answer = await client.AuthorizationV1Api(api).create_self_subject_access_review(
        review, _request_timeout=API_TIMEOUT_S)
    return bool(answer.status.allowed)


async def check_permissions(api: client.ApiClient, namespaces: Sequence[str] = (),
                            fleet_namespace: str | None = None) -> CheckResult:
    """A SelfSubjectAccessReview per entry of the agent's permission table: the authorizer's own answer.

    The table (`metal_agent.core.permissions`) is the one the code and the
    RBAC manifest are held to, so the doctor checks exactly what the agent
    will do. Without --namespace the agent watches every namespace, so each
    permission is asked cluster-wide (an empty namespace means all). A
    denial names the permission and what the agent needs it for.
    """
    name = "Permissions"
    scopes = list(namespaces) or [""]
    asks = [(perm, ns) for ns in scopes for perm in AGENT_PERMISSIONS]
    if fleet_namespace:  # run --fleet: the Leases, in their one namespace (the Role metal-agent-fleet)
        asks += [(perm, fleet_namespace) for perm in FLEET_PERMISSIONS]
    limit = asyncio.Semaphore(8)

    async def ask(perm: Permission, ns: str) -> bool:
        async with limit:
            return await _allowed(api, perm, ns)

    try:
        answers = await asyncio.gather(*(ask(p, ns) for p, ns in asks))
    except ApiException as exc:
        return fail(name, f"SelfSubjectAccessReview failed: {exc.status} {exc.reason}", RBAC_FIX)
    except Exception as exc:  # noqa: BLE001
        return fail(name, f"SelfSubjectAccessReview failed: {type(exc).__name__}: {exc}", RBAC_FIX)
    denied = [f"{p}" + (f" in {ns}" if ns else "") + f" ({p.why})"
              for (p, ns), allowed in zip(asks, answers) if not allowed]
    where = ", ".join(namespaces) if namespaces else "all namespaces"
    if denied:
        return fail(name, f"denied ({where}): {'; '.join(denied)}", RBAC_FIX)
    if fleet_namespace:
        where += f"; fleet Leases in {fleet_namespace}"
    count = len(AGENT_PERMISSIONS) + (len(FLEET_PERMISSIONS) if fleet_namespace else 0)
    return ok(name, f"all {count} permissions granted ({where})")


async def _list(api: client.ApiClient, plural: str, namespaces: Sequence[str]) -> list[dict]:
    custom = client.CustomObjectsApi(api)
    if not namespaces:
        return (await custom.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=API_TIMEOUT_S))["items"]
    items: list[dict] = []
    for ns in namespaces:
        items += (await custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural,
                                                             _request_timeout=API_TIMEOUT_S))["items"]
    return items


def ownership_result(isvcs: list[dict], models: list[dict]) -> CheckResult:
    """What `--status-mode auto` decides for the Metal services the cluster holds, and why."""
    name = "Status ownership"
    by_key = {f"{m['metadata'].get('namespace')}/{m['metadata'].get('name')}": m for m in models}

    def model_of(isvc: dict) -> dict | None:
        ref = wanted_model(isvc)
        return by_key.get(f"{ref[0]}/{ref[1]}") if ref else None

    ours = [i for i in isvcs if not isinstance(evaluate(i, model_of(i)), NotOurs)]
    seen = any(shows_controller(i, None) for i in isvcs) or any(shows_controller(None, m) for m in models)
    if not ours:
        why = "LLMKube's controller is at work here" if seen else "no LLMKube controller seen"
        return ok(name, f"no Metal InferenceService yet ({why}); --status-mode auto decides per service")
    owners = [decide(StatusMode.AUTO, i, model_of(i), controller_seen=seen) for i in ours]
    shared = [o for o in owners if o.shared]
    if shared:
        detail = (f"shared with LLMKube's controller for {len(shared)} of {len(ours)} Metal service(s) "
                  f"({shared[0].why}): the agent writes only its own fields")
    else:
        detail = f"full for {len(ours)} Metal service(s): no LLMKube controller writes status (CRDs only)"
    return ok(name, detail + "; force with `metal-agent run --status-mode full|shared`")


async def check_status_ownership(api: client.ApiClient, namespaces: Sequence[str] = ()) -> CheckResult:
    try:
        isvcs, models = await asyncio.gather(_list(api, ISVC_PLURAL, namespaces), _list(api, MODEL_PLURAL, namespaces))
    except Exception as exc:  # noqa: BLE001 - the permission check names what is missing
        return skip("Status ownership", f"cannot list InferenceServices and Models: {type(exc).__name__}")
    return ownership_result(isvcs, models)


def _kubeconfig_files(kubeconfig: str | None) -> list[str]:
    """The files the client would read: the flag, else $KUBECONFIG (a path list), else ~/.kube/config."""
    value = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [os.path.expanduser(p) for p in value.split(os.pathsep) if p]


async def cluster_checks(kubeconfig: str | None, context: str | None, namespaces: Sequence[str],
                         fleet_namespace: str | None = None) -> list[CheckResult]:
    """API, CRDs and permissions; the last two are skipped when the API does not answer."""
    needs_api = [skip("CRDs", "needs the Kubernetes API"), skip("Permissions", "needs the Kubernetes API"),
                 skip("Status ownership", "needs the Kubernetes API")]
    load_fix = "pass --kubeconfig FILE (and --context NAME) for the metal-agent identity"
    files = _kubeconfig_files(kubeconfig)
    if not any(os.path.isfile(f) for f in files):
        return [fail("Kubernetes API", f"no kubeconfig file at {os.pathsep.join(files)}", load_fix), *needs_api]
    try:
        api = await _load_api(kubeconfig, context)
    except Exception as exc:  # noqa: BLE001 - bad YAML, unknown context, exec plugin failure
        return [fail("Kubernetes API", f"cannot load {os.pathsep.join(files)}: {type(exc).__name__}: {exc}",
                     load_fix), *needs_api]
    try:
        api_result = await check_kube(api)
        if api_result.status is not Status.OK:
            return [api_result, *needs_api]
        crds, perms, owner = await asyncio.gather(check_crds(api), check_permissions(api, namespaces, fleet_namespace),
                                                  check_status_ownership(api, namespaces))
        return [api_result, crds, perms, owner]
    finally:
        await api.close()
