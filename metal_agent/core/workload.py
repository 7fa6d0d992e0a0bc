"""What a claimed and validated InferenceService becomes: the unit every other part works on.

It lives on its own, below the claim rule and the engines, because both
need it: the claim rule (`core.claim`) builds one, and the engines
(`core.engines`) turn one into a command line, a memory estimate and the
fields they refuse. Kept apart, neither has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.core.api import InferenceService, Model


@dataclass(frozen=True, slots=True)
class Workload:
    """A validated InferenceService together with the Model it serves, and the draft Model
    of its speculative decoding when its engine uses one (mlx_lm.server)."""

    isvc: InferenceService
    model: Model
    draft: Model | None = None
