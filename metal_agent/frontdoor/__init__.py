"""The front door: the Mac's data plane (issue 21), run as its own process.

`metal-agent front-door` listens on a stable port per InferenceService (and the
client port on loopback) and forwards requests to the engines the agent's
routing table names. The agent steers it over a Unix socket; nothing here talks
to Kubernetes.
"""
