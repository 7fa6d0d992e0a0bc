"""doctor's check of the MLX engine: is `mlx_lm.server` there, and which mlx-lm is it?

Optional, unlike llama-server: without it GGUF Models run as ever and MLX
Models wait with `RuntimeMissing`, so a missing one is a skip with the fix,
not a failure; a path given explicitly that does not work is a failure.
The search is the agent's own (`adapters.mlx_binary`): the agent's venv,
Homebrew, PATH.
"""

from __future__ import annotations

from metal_agent.adapters import mlx_binary
from metal_agent.cli.doctor_base import CheckResult, fail, ok, skip

NAME = "mlx_lm.server"
FIX = ("pip install mlx-lm into the agent's venv (`<venv>/bin/pip install mlx-lm`), or pass --mlx-server PATH;"
       " then restart the agent")


async def check_mlx_server(explicit: str | None) -> CheckResult:
    path = mlx_binary.find_mlx_server(explicit)
    if path is None:
        return skip(NAME, f"not installed (MLX Models wait until it is): {FIX}")
    found = await mlx_binary.probe(path)
    if isinstance(found, str):
        return fail(NAME, found, FIX) if explicit else skip(NAME, f"{found}: {FIX}")
    return ok(NAME, f"{' '.join(found.command)} (mlx-lm {found.version})")
