"""Names fixed by the wire contract with LLMKube and InferCost (docs: llmkube-compat), and Kubernetes' name rules."""

import re as _re

GROUP = "inference.llmkube.dev"
VERSION = "v1alpha1"
ISVC_PLURAL = "inferenceservices"
MODEL_PLURAL = "models"
COMPONENT = "llmkube-metal-agent"  # Event source component
METRIC_PREFIX = "llmkube_metal_agent_"

# Kubernetes' own name rules, shared by validation and the CLI.

_DNS1123_LABEL = _re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = _re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def is_dns1123_label(value: str) -> bool:
    """A namespace name: at most 63 lower-case letters, digits and '-', alphanumeric at both ends."""
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    """Most object names: labels joined by '.', at most 253 characters."""
    return len(value) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(value) is not None
