"""The agent's HTTP side: /metrics, /healthz, /readyz, the local status API, and the
agent's own metrics endpoint on the registered address."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from kubernetes_asyncio import client
from prometheus_client import CollectorRegistry

from metal_agent import __version__
from metal_agent.adapters.http_server import Listeners, create_app
from metal_agent.adapters.kube.agent_registrar import AgentRegistrar
from metal_agent.adapters.kube.authorizer import KubeAuthorizer
from metal_agent.adapters.process.manager import ProcessManager
from metal_agent.adapters.refusal_log import RefusalLog
from metal_agent.app.config import AgentConfig
from metal_agent.app.loops import services_view
from metal_agent.app.readiness import Readiness
from metal_agent.controller.agent_endpoint import MetricsEndpoint
from metal_agent.core.host_info import HostFacts
from metal_agent.core.review_limits import ReviewLimiter
from metal_agent.metrics import AgentMetrics


@dataclass
class HttpParts:
    app: web.Application
    listeners: Listeners
    refusals: RefusalLog
    endpoint: MetricsEndpoint | None  # None: the agent's metrics are not published


def _services_route(processes: ProcessManager, front_door=None, mac_view=None):
    async def services(_: web.Request) -> web.Response:
        payload = {"version": __version__, "services": services_view(processes)}
        if mac_view is not None:
            payload["mac"] = mac_view()
        if front_door is not None:
            payload["routes"] = await front_door.status_routes()
        return web.json_response(payload)
    return services


def build_http(cfg: AgentConfig, api: client.ApiClient, *, registry: CollectorRegistry, metrics: AgentMetrics,
               readiness: Readiness, processes: ProcessManager, facts: HostFacts, address: str,
               fleet=None, front_door=None, mac_view=None) -> HttpParts:
    """Requests a browser could have forged are refused; those that do not arrive on loopback
    need a token the cluster vouches for, and reviews of unknown tokens are budgeted."""
    http = cfg.http
    authorizer = KubeAuthorizer(api, limiter=ReviewLimiter(per_source_rate=http.token_review_rate,
                                                           global_rate=http.token_review_global_rate),
                                reviews_counter=metrics.token_reviews)
    refusals = RefusalLog(counter=metrics.http_refusals)
    extra = None
    if front_door is not None:
        from metal_agent.app.front_door import MetricsAppender

        extra = MetricsAppender(front_door.client)
    app = create_app(registry, ready=readiness, authorize=authorizer.authorize, refusals=refusals,
                     allowed_hosts=frozenset(h.lower() for h in (*http.allowed_hosts, http.host)
                                             if h not in ("0.0.0.0", "::", "")), extra_metrics=extra,
                     note=readiness.note)
    app.router.add_get("/v1/services", _services_route(processes, front_door, mac_view))
    if fleet is not None:
        from metal_agent.fleet.view import add_routes

        add_routes(app, fleet.view)
    listeners = Listeners(app)
    reg = cfg.registration
    # The cluster's Prometheus finds this agent at its registered address (core/agent_registration.py).
    endpoint = MetricsEndpoint(
        listeners, AgentRegistrar(api, agent_version=__version__), namespace=reg.agent_namespace,
        host=facts.host, chip=facts.chip, address=address, port=http.port, listen_host=http.host,
        interval=reg.heartbeat_interval,
    ) if reg.register and reg.register_metrics else None
    return HttpParts(app, listeners, refusals, endpoint)
