"""llama-server as an `Engine`: the agent's original runtime, unchanged.

Everything here delegates to the modules that already describe llama-server
(`core.argv`, `core.llama_log`, `core.memory`, `core.gguf_header`), so the
seam adds no behaviour of its own: the same command line, the same /health
readiness (llama-server answers 503 until its model is loaded), the same log
reading and the same estimate from the GGUF header.
"""

from __future__ import annotations

from dataclasses import dataclass

from metal_agent.core import llama_log
from metal_agent.core.api import InferenceServiceSpec, Model
from metal_agent.core.argv import AgentArgvOptions, build_argv
from metal_agent.core.claim import Workload
from metal_agent.core.engine import EngineName, Launch, ModelReader, Probe
from metal_agent.core.extra_args import OptionTable
from metal_agent.core.fields import UNSUPPORTED_FIELD
from metal_agent.core.gguf_header import GGUFError, GGUFHeader, read_header_from
from metal_agent.core.llama_log import Acceleration
from metal_agent.core.llama_options import LLAMA_SERVER_OPTIONS
from metal_agent.core.memory import EstimateFailed, MemoryEstimate, ModelShape, estimate_memory, model_shape
from metal_agent.core.registration import RUNTIME_LLAMACPP
from metal_agent.core.result import FieldError

#: speculativeDecoding types that mean "no speculation" (LLMKube's alias and llama.cpp's spelling).
NO_SPECULATION = ("none", "disabled")

HEADER_FIRST_READ = 1 << 20  # the read window: bytes looked at are read in windows this size
HEADER_MAX_READ = 128 << 20


def read_header(reader: ModelReader, first: int = HEADER_FIRST_READ,
                limit: int = HEADER_MAX_READ) -> tuple[GGUFHeader | GGUFError, int]:
    """The GGUF header of the file behind `reader` and the file's size: a first read of
    `first` bytes, more only if the metadata is longer, never past `limit`; one parse."""
    try:
        size = reader.size("")
        return read_header_from(lambda offset, length: reader.read("", offset, length), size, first, limit), size
    except OSError as err:
        return GGUFError(f"cannot read {reader.where}: {reader.explain(err)}"), 0


@dataclass(frozen=True, slots=True)
class GGUFInputs:
    """A GGUF model's estimate inputs: small, so many can be cached (never the header itself)."""

    shape: ModelShape
    weights_bytes: int


@dataclass(frozen=True)
class LlamaServer:
    name: EngineName = EngineName.LLAMA_SERVER
    display: str = "llama-server"
    runtime_label: str = RUNTIME_LLAMACPP  # LLMKube's value for llama.cpp pods
    probe: Probe = Probe()
    directory_model: bool = False
    options: OptionTable = LLAMA_SERVER_OPTIONS

    def refusals(self, workload: Workload) -> tuple[FieldError, ...]:
        """Validation's rules are llama-server's own, but for speculative decoding, which this agent
        does not pass to llama-server yet: refused when it asks for speculation, never ignored."""
        kind = workload.isvc.spec.speculative_type
        if kind is None or kind in NO_SPECULATION:
            return ()
        return (FieldError("spec.speculativeDecoding.type", f"{kind!r} cannot be honoured by metal-agent:"
                           " speculative decoding is not passed to llama-server yet; remove speculativeDecoding"
                           " (or set type none)", "InferenceService", workload.isvc.meta.key, UNSUPPORTED_FIELD),)

    def wants_draft(self, spec: InferenceServiceSpec) -> bool:
        return False  # speculativeDecoding is refused (see refusals)

    def draft_refusals(self, draft: Model) -> tuple[FieldError, ...]:
        return ()

    def argv(self, workload: Workload, launch: Launch) -> tuple[str, ...]:
        argv = build_argv(workload, AgentArgvOptions(
            binary=launch.command[-1], model_path=launch.model_path, host=launch.host, port=launch.port,
            threads=launch.threads, mlock=launch.mlock, mlock_style=launch.mlock_style,
            verbosity_flag=launch.verbosity_flag, no_jinja=launch.no_jinja, no_slots=launch.no_slots,
        ))
        return (*launch.command[:-1], *argv)

    def acceleration(self, log_text: str) -> Acceleration | None:
        return llama_log.parse_acceleration(log_text)

    def problem_lines(self, log_text: str, limit: int = 5) -> list[str]:
        return llama_log.problem_lines(log_text, limit)

    def estimate_inputs(self, reader: ModelReader) -> GGUFInputs | EstimateFailed:
        """The model's shape from its GGUF header, and the file's size (the weights)."""
        header, size = read_header(reader)
        if isinstance(header, GGUFError):
            return EstimateFailed(f"cannot read the model's GGUF header: {header.message}")
        shape = model_shape(header)
        return shape if isinstance(shape, EstimateFailed) else GGUFInputs(shape, size)

    def estimate_with(self, inputs: GGUFInputs | EstimateFailed, spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
        if isinstance(inputs, EstimateFailed):
            return inputs
        return estimate_memory(inputs.shape, inputs.weights_bytes, spec)

    def estimate(self, reader: ModelReader, spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
        return self.estimate_with(self.estimate_inputs(reader), spec)


LLAMA_SERVER = LlamaServer()
