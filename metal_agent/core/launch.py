"""How this agent launches engines: one value for the agent, one small value per process.

Every command line the agent runs is made of three inputs:

* the workload (`core.workload`), the validated spec: what to serve;
* `LaunchSettings`, the agent's own decisions, the same for every process
  it starts: how to start each engine's server (found on this Mac at
  start-up), the address servers bind to and the one registered for them,
  the performance-core count, whether model memory is pinned, the flag
  dialect of the llama-server binary (`core.flags.Dialect`, read from its
  `--help`), the options of the installed mlx_lm.server
  (`core.mlx_dialect.MlxDialect`, from its `--help`), the engine for formats that name none, and what the Mac's
  owner allows specs (`core.spec_policy`);
* `Instance`, what differs between two processes of the same agent: where
  this workload's model (and draft model) files are on this Mac, and the
  port the supervisor picked.

The engines' argv builders take the three (`core.engine.Engine.argv`).
Pure: the values are decided by adapters and the composition root; bad
values here are programming errors and fail at construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.core.engine_name import EngineName
from metal_agent.core.flags import Dialect
from metal_agent.core.mlx_dialect import MlxDialect
from metal_agent.core.spec_policy import SpecPolicy


def _check_text(name: str, value: str) -> None:
    if not value or "\x00" in value:
        raise ValueError(f"{name} must be a non-empty string without NUL")


@dataclass(frozen=True, slots=True)
class LaunchSettings:
    """The agent-wide inputs of every command line (see the module docstring).

    `llama_server` is the llama-server binary's path. `mlx_server` is how to
    start mlx_lm.server: an interpreter and the `mlx_lm.server` script, so
    that the process's command line is exactly the argv the agent recorded
    (adoption compares the two), or () when mlx-lm was not found.
    `threads` None omits `--threads` (the server picks). `host` is where
    servers bind; `register_address` the address put in EndpointSlices
    (None: the agent does not register). `mlx_dialect` is what the installed
    mlx_lm.server accepts; its default (help unread) assumes a current one.
    """

    llama_server: str
    mlx_server: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    register_address: str | None = None
    threads: int | None = None
    mlock: bool = True
    dialect: Dialect = Dialect()
    default_engine: EngineName = EngineName.LLAMA_SERVER  # serves Models whose format names no engine (`custom`)
    policy: SpecPolicy = SpecPolicy()
    mlx_dialect: MlxDialect = MlxDialect()

    def __post_init__(self) -> None:
        _check_text("llama_server", self.llama_server)
        for part in self.mlx_server:
            _check_text("mlx_server", part)
        _check_text("host", self.host)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")

    def command(self, engine: EngineName) -> tuple[str, ...]:
        """How to start `engine`'s server; () when it is not installed."""
        return {EngineName.LLAMA_SERVER: (self.llama_server,), EngineName.MLX_LM: self.mlx_server}[engine]


@dataclass(frozen=True, slots=True)
class Instance:
    """One process's own inputs: its model on this Mac, its draft model's (speculative decoding,
    None without one), and the port the supervisor picked."""

    model_path: str
    port: int
    draft_model_path: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        _check_text("model_path", self.model_path)
        if self.draft_model_path is not None:
            _check_text("draft_model_path", self.draft_model_path)
