"""How a supervisor treats its process: load time allowed, probe rhythm, restart back-off.

Plain data in a module of its own, without the supervisor's imports (aiohttp,
psutil), so that the agent's settings (`app.config`) and the CLI that reads
its defaults stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metal_agent.core.backoff import Backoff


@dataclass(frozen=True)
class SupervisorSettings:
    startup_timeout: float = 600.0  # big models take minutes to load
    liveness_interval: float = 5.0
    liveness_timeout: float = 3.0
    liveness_failures: int = 3
    # Between liveness probes, quick readiness probes: a server that stops answering is
    # taken out of its EndpointSlice within about a second, long before it is restarted.
    readiness_interval: float = 0.5
    readiness_timeout: float = 0.5
    stop_grace: float = 10.0
    backoff: Backoff = field(default_factory=lambda: Backoff(first_immediate=True))
