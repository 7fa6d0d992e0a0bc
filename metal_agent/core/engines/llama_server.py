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
from metal_agent.core.api import InferenceServiceSpec, Model, ModelFormat, RopeScalingType
from metal_agent.core.argv import (
    CACHE_RAM,
    DRAFT_WEIGHT_TYPES,
    NEEDS_DRAFT_WEIGHTS,
    SPEC_TYPES,
    build_argv,
    prompt_cache_mib,
    spec_type,
)
from metal_agent.core.engine import ModelReader, Probe
from metal_agent.core.engine_name import EngineName
from metal_agent.core.extra_args import EXTRA_ARG_REFUSED, OptionTable
from metal_agent.core.fields import UNSUPPORTED_FIELD
from metal_agent.core.gguf_header import GGUFError, GGUFHeader, read_header_from
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.llama_log import Acceleration
from metal_agent.core.llama_options import LLAMA_SERVER_OPTIONS
from metal_agent.core.memory import MiB, EstimateFailed, MemoryEstimate, ModelShape, estimate_memory, model_shape
from metal_agent.core.registration import RUNTIME_LLAMACPP
from metal_agent.core.result import FieldError
from metal_agent.core.workload import Workload

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
        """What LLMKube's CRD admits and this llama-server cannot run (each checked against its source):
        speculative decoding it cannot set up, `longrope` rope scaling, an unbounded prompt cache."""
        spec, key = workload.isvc.spec, workload.isvc.meta.key
        errors: list[FieldError] = []

        def refuse(path: str, message: str, reason: str = UNSUPPORTED_FIELD) -> None:
            errors.append(FieldError(path, message, "InferenceService", key, reason))

        errors += _speculative_refusals(spec, key, workload.model.spec.files)
        if spec.rope_scaling is not None and spec.rope_scaling.type is RopeScalingType.LONGROPE:
            refuse("spec.ropeScaling.type", "'longrope' cannot be honoured by metal-agent: llama-server's"
                   " --rope-scaling accepts only none, linear or yarn (it reads LongRoPE factors from the GGUF"
                   " itself), and would exit at start; remove ropeScaling.type or use linear or yarn")
        if prompt_cache_mib(spec) < 0:
            index = max(i for i, token in enumerate(spec.extra_args) if token.split("=", 1)[0] in ("-cram", CACHE_RAM))
            refuse(f"spec.extraArgs[{index}]", f"{CACHE_RAM} {prompt_cache_mib(spec)} (no limit) cannot be"
                   " admitted: memory admission counts the host prompt cache, so it needs a size in MiB"
                   " (0 turns it off)", EXTRA_ARG_REFUSED)
        return tuple(errors)

    def server_refusals(self, workload: Workload, settings: LaunchSettings) -> tuple[FieldError, ...]:
        return ()  # the flag dialect (core.flags.Dialect) adapts the argv; nothing a spec sets is versioned

    def wants_draft(self, spec: InferenceServiceSpec) -> bool:
        return spec_type(spec) in DRAFT_WEIGHT_TYPES and spec.draft_model_ref is not None

    def draft_refusals(self, draft: Model) -> tuple[FieldError, ...]:
        """llama-server loads a draft the way it loads a model: one GGUF file."""
        if draft.spec.format in (ModelFormat.GGUF, ModelFormat.CUSTOM):
            return ()
        return (FieldError("spec.format", f"{draft.spec.format.value} cannot be a draft model for llama-server,"
                           " which loads GGUF files; use a GGUF Model", "Model", draft.meta.key),)

    def argv(self, workload: Workload, settings: LaunchSettings, instance: Instance) -> tuple[str, ...]:
        return build_argv(workload, settings, instance)

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
        return estimate_memory(inputs.shape, inputs.weights_bytes, spec, max(0, prompt_cache_mib(spec)) * MiB)

    def estimate(self, reader: ModelReader, spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
        return self.estimate_with(self.estimate_inputs(reader), spec)


LLAMA_SERVER = LlamaServer()


def _speculative_refusals(spec: InferenceServiceSpec, key: str, files: tuple[str, ...] = ()) -> list[FieldError]:
    """`speculativeDecoding` llama-server cannot run as written (LLMKube's CRD checks most of this;
    a manifest rendered offline or a lagging CRD does not)."""
    base = "spec.speculativeDecoding"
    kind = spec_type(spec)
    errors: list[FieldError] = []

    def refuse(path: str, message: str, reason: str = "") -> None:
        errors.append(FieldError(path, message, "InferenceService", key, reason))

    if kind is None:
        return errors
    if kind not in SPEC_TYPES:
        refuse(f"{base}.type", f"{spec.speculative_type!r} is not a speculative decoding type of llama-server;"
               f" use one of {', '.join(SPEC_TYPES)} (or LLMKube's draft, mtp, disabled)")
    elif spec.draft_model_file is not None and spec.draft_model_ref is not None:
        refuse(f"{base}.draftModel", "set draftModel (a file of the Model's spec.files) or draftModelRef (a"
               " draft Model), not both")
    elif spec.draft_model_file is not None and spec.draft_model_file not in files:
        refuse(f"{base}.draftModel", f"{spec.draft_model_file!r} is not one of the Model's spec.files: list it"
               " there, so it is fetched with the model")
    elif spec.draft_model_file is not None and kind not in DRAFT_WEIGHT_TYPES:
        refuse(f"{base}.draftModel", f"type {kind} takes no draft model (only the draft-* types do)")
    elif kind in NEEDS_DRAFT_WEIGHTS and spec.draft_model_ref is None and spec.draft_model_file is None:
        refuse(f"{base}.draftModelRef", f"type {kind} needs draft weights: name a GGUF Model in the same namespace")
    elif kind not in DRAFT_WEIGHT_TYPES and spec.draft_model_ref is not None:
        refuse(f"{base}.draftModelRef", f"type {kind} takes no draft model (only the draft-* types do)")
    if spec.draft_p_min is not None and not 0 <= spec.draft_p_min <= 1:
        refuse(f"{base}.pMin", f"must be between 0 and 1, got {spec.draft_p_min}")
    return errors
