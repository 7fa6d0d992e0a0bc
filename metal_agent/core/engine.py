"""The runtime seam: what differs between the inference engines a Mac can run.

metal-agent supervises, registers, admits and reports every model the same
way; only a handful of things depend on the engine that serves it. They are
gathered in one small interface, `Engine`, so that the reconciler, the
supervisor and the memory guard never ask "which engine is this?":

* which spec fields it honours and which it must refuse (`refusals`, field
  errors with paths, as validation reports them),
* the command line for a validated workload (`argv`),
* how to tell that it is alive and that its model is loaded (`probe`),
* what its log says about where the model landed and why a start failed
  (`acceleration`, `problem_lines`),
* how much unified memory it will take, from the model files (`estimate`,
  reading through a `ModelReader` the adapter hands in, so the arithmetic
  stays pure and the bytes come from disk in a worker thread).

Which engine serves a model is decided by the Model's `format`
(`core.engines.engine_for`): GGUF files go to llama-server, MLX directories
to `mlx_lm.server`, and a format that names no engine (`custom`) to the
agent's default (`--default-runtime`, llama-server unless changed). The
engines live in `core.engines`, one module each, with the registry that
picks one; nothing outside them branches on an engine. This module is below
them all: it names the seam and imports no engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from metal_agent.core.api import InferenceServiceSpec, Model
from metal_agent.core.engine_name import EngineName
from metal_agent.core.extra_args import OptionTable
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.llama_log import Acceleration
from metal_agent.core.memory import EstimateFailed, MemoryEstimate
from metal_agent.core.result import FieldError
from metal_agent.core.workload import Workload


@dataclass(frozen=True, slots=True)
class Probe:
    """How the supervisor knows the server is alive, and when its model is loaded.

    `health_path` answers 200 while the server is healthy (liveness, and
    readiness too when `ready_path` is None: llama-server answers 503 until
    its model is loaded). `ready_path`, when set, is a POST with
    `ready_body` (JSON) that the server only answers once the model is
    loaded, for servers whose health check turns green before that: it is
    sent once, after /health first answers, and awaited.
    """

    health_path: str = "/health"
    ready_path: str | None = None
    ready_body: str | None = None


class ModelReader(Protocol):
    """Read-only access to a model's files (one file: name ""; a directory: relative names).

    Methods raise OSError as the file system does; engines turn that into
    `EstimateFailed`, worded by `explain` (which may add what to do, e.g.
    macOS privacy protection). `where` names the model for messages.
    """

    where: str

    def explain(self, err: OSError) -> str: ...

    def names(self) -> list[str]: ...

    def size(self, name: str) -> int: ...

    def read(self, name: str, offset: int, length: int) -> bytes: ...


class Engine(Protocol):
    name: EngineName
    display: str  # what the process is called in Events and logs ("llama-server", "mlx_lm.server")
    runtime_label: str  # the `inference.llmkube.dev/runtime` label value of its Service and slices
    probe: Probe
    directory_model: bool  # the model is a directory (MLX) rather than one file (GGUF)
    options: OptionTable  # every option of its server, classified for extraArgs (core.extra_args)

    def refusals(self, workload: Workload) -> tuple[FieldError, ...]: ...

    def server_refusals(self, workload: Workload, settings: LaunchSettings) -> tuple[FieldError, ...]:
        """What `workload` needs of the installed server (as `settings` describe it, probed at
        start-up) that this one lacks: the spec is refused naming the release that has it."""

    def wants_draft(self, spec: InferenceServiceSpec) -> bool:
        """Does it run `spec`'s speculative decoding with a draft Model (which must then be found)?"""

    def draft_refusals(self, draft: Model) -> tuple[FieldError, ...]: ...

    def argv(self, workload: Workload, settings: LaunchSettings, instance: Instance) -> tuple[str, ...]:
        """The full command line (argv[0] is `settings.command(self.name)`[0]) that serves `workload`."""

    def acceleration(self, log_text: str) -> Acceleration | None: ...

    def problem_lines(self, log_text: str, limit: int = 5) -> list[str]: ...

    def estimate_inputs(self, reader: ModelReader) -> object:
        """What the estimate needs from the model's files, whatever the service (blocking: it reads
        the files; the adapter runs it in a thread and caches it by file identity), or EstimateFailed."""

    def estimate_with(self, inputs: object, spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
        """The estimate for `spec` from `estimate_inputs`' answer (pure and quick)."""

    def estimate(self, reader: ModelReader, spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
        """`estimate_with(estimate_inputs(reader), spec)`."""
