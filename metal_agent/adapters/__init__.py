"""Thin adapters between the pure core and the outside world (Kubernetes, processes, HTTP)."""
