"""Kubernetes adapters: watching, status and Event writing, registration."""
