"""The engines metal-agent can run, one module each (see `core.engine`), and the registry
that picks the one serving a Model.

The registry lives here, above the engines it lists, so that nothing below
(`core.engine`, `core.workload`, the engines themselves) needs to import it.
"""

from __future__ import annotations

from metal_agent.core.api import Model
from metal_agent.core.engine import Engine
from metal_agent.core.engine_name import EngineName, engine_name_for
from metal_agent.core.engines.llama_server import LLAMA_SERVER
from metal_agent.core.engines.mlx_lm import MLX_LM
from metal_agent.core.workload import Workload

ENGINES: dict[EngineName, Engine] = {LLAMA_SERVER.name: LLAMA_SERVER, MLX_LM.name: MLX_LM}


def engine_for(workload: Workload, default: EngineName = EngineName.LLAMA_SERVER) -> Engine:
    """The engine that serves `workload`'s Model."""
    return engine_for_model(workload.model, default)


def engine_for_model(model: Model, default: EngineName = EngineName.LLAMA_SERVER) -> Engine:
    return ENGINES[engine_name_for(model.spec.format, default)]


def engine_named(name: EngineName | str) -> Engine:
    return ENGINES[EngineName(name)]
