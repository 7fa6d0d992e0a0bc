"""metal-agent: run llama-server natively on Apple Silicon for a Kubernetes cluster."""

__version__ = "0.1.0"
