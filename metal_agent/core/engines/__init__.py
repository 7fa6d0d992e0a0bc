"""The engines metal-agent can run, one module each (see `core.engine`)."""

from __future__ import annotations

from metal_agent.core.engine import Engine, EngineName
from metal_agent.core.engines.llama_server import LLAMA_SERVER
from metal_agent.core.engines.mlx_lm import MLX_LM

ENGINES: dict[EngineName, Engine] = {LLAMA_SERVER.name: LLAMA_SERVER, MLX_LM.name: MLX_LM}
