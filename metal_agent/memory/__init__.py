"""Memory admission and the answers to memory pressure."""
