"""Names fixed by the wire contract with LLMKube and InferCost (docs: llmkube-compat)."""

GROUP = "inference.llmkube.dev"
VERSION = "v1alpha1"
ISVC_PLURAL = "inferenceservices"
MODEL_PLURAL = "models"
COMPONENT = "llmkube-metal-agent"  # Event source component
METRIC_PREFIX = "llmkube_metal_agent_"
