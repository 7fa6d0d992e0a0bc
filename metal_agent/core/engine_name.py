"""The engines by name, and which one a Model's format calls for.

Apart from `core.engine` (the seam itself) so that the agent's launch
settings (`core.launch`), which name engines, sit below the seam that takes
them, and the adapters that only record or compare names need nothing more.
"""

from __future__ import annotations

from enum import StrEnum

from metal_agent.core.api import ModelFormat


class EngineName(StrEnum):
    """The engines, by the name used in flags, logs, metrics labels and the process's Events."""

    LLAMA_SERVER = "llama-server"
    MLX_LM = "mlx-lm"


#: Formats that decide their engine; any other servable format (`custom`) gets the default.
FORMAT_ENGINES = {ModelFormat.GGUF: EngineName.LLAMA_SERVER, ModelFormat.MLX: EngineName.MLX_LM}


def engine_name_for(fmt: ModelFormat, default: EngineName = EngineName.LLAMA_SERVER) -> EngineName:
    return FORMAT_ENGINES.get(fmt, default)
