"""The labels a scrape of each registered object carries in Prometheus: the contract with dashboards.

`manifests/monitoring/` relabels discovered EndpointSlices into these
labels; LLMKube's alerts and SLOs match `job="llmkube-inference"` with
`namespace` and `service` (the InferenceService's own name), its dashboards
group by `model` and `runtime`, and `host` joins a Mac's llama-servers to
its energy. Written down once here, so the unit tests can hold the shipped
relabel rules to it and the integration tests can hold a real Prometheus to
it.
"""

from __future__ import annotations

from metal_agent.core.agent_registration import AgentEndpoint
from metal_agent.core.registration import Registration, label_value

INFERENCE_JOB = "llmkube-inference"
AGENT_JOB = "metal-agent"


def _present(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if v}  # Prometheus drops empty labels


def inference_target_labels(reg: Registration, host: str) -> dict[str, str]:
    return _present({
        "job": INFERENCE_JOB, "namespace": reg.namespace, "service": label_value(reg.isvc_name),
        "model": label_value(reg.model), "runtime": label_value(reg.runtime), "host": label_value(host),
    })


def agent_target_labels(endpoint: AgentEndpoint) -> dict[str, str]:
    return _present({
        "job": AGENT_JOB, "namespace": endpoint.namespace, "host": label_value(endpoint.host),
    })
