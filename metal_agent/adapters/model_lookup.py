"""The model store's three answers: ready (where), pending (why not yet), or a Blocker (why never).

Why its own module: both the one-file store (`adapters.model_files`) and the
file sets (`adapters.model_sets`) answer with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metal_agent.core.status import Blocker


@dataclass(frozen=True)
class ModelReady:
    path: Path
    sha256: str | None = None  # known for downloaded files


@dataclass(frozen=True)
class ModelPending:
    message: str


Lookup = ModelReady | ModelPending | Blocker
