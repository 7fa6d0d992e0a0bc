"""What every part of the fleet is built with, and the one place the fleet's defaults are written.

Separate from the ports (`fleet.ports`, which pull in the Kubernetes client and
aiohttp) so that `app.config`, which the CLI imports for every invocation, can
take its fleet defaults (`FleetConfig`, hence `metal-agent run`'s flag defaults)
from here without loading either. The fleet may not import the app, so the
defaults live on this side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metal_agent.core.launch import LaunchSettings
from metal_agent.core.spec_policy import SpecPolicy


@dataclass(frozen=True)
class FleetSettings:
    """One Mac's fleet settings; `fleet.wiring.settings_from` builds them from the agent's configuration."""

    member: str
    namespace: str = "metal-agent"
    labels: dict[str, str] = field(default_factory=dict)
    lease_duration: float = 40.0
    renew_interval: float = 10.0
    bid_step: float = 2.0  # seconds of delay per place in the preference order
    host: str = ""
    chip: str = ""
    total_ram: int = 0
    agent_fraction: float | None = None
    default_engine: str = "llama-server"  # the agent's --default-runtime: judged as the reconciler judges
    policy: SpecPolicy = SpecPolicy()  # the owner's --allow-extra-arg (and roots): judged as the reconciler judges
    namespaces: tuple[str, ...] | None = None  # the watched namespaces (None: all), for a silent Mac's slices
    # The reconciler's launch settings (the servers found on this Mac): a Mac whose mlx-lm is too
    # old for a service must not bid for it. None: current servers assumed (tests, no probe).
    launch: LaunchSettings | None = None

    @property
    def tick(self) -> float:
        return max(0.05, min(1.0, self.renew_interval / 2))

    @property
    def lease_seconds(self) -> int:
        """A Lease's `leaseDurationSeconds` (whole seconds, at least one)."""
        return max(1, round(self.lease_duration))
