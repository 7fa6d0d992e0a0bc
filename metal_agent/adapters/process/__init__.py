"""Spawning, watching, adopting and stopping native llama-server processes."""
