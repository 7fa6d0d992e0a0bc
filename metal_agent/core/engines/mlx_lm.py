"""`mlx_lm.server` (the `mlx-lm` package) as an `Engine`: MLX model directories on Apple Silicon.

MLX is often the faster engine on a Mac, and LLMKube's `Model.spec.format`
already has the value `mlx`. This module is everything metal-agent knows
about that server; the rest of the agent treats it like llama-server.

Spec mapping (checked against `mlx_lm.server --help` of mlx-lm 0.32):

* `contextSize` sizes the KV cache in the memory estimate. mlx_lm.server has
  no context limit of its own (a request may grow past it), so the estimate
  is what enforces it: admission reserves `contextSize` tokens per slot.
* `cacheTypeK`/`cacheTypeV` `q8_0` or `q4_0` -> `--kv-bits 8|4` with
  `--quantized-kv-start 0`, so the cache is quantized from the first token
  and the estimate holds. MLX quantizes K and V together, so the two must
  be equal; `f16`/`bf16` (or unset) keep the model's own dtype; every other
  type is refused with the reason.
* `parallelSlots` -> `--decode-concurrency N` (always said: mlx_lm's default
  is 32, which the estimate could not see) and `--prompt-cache-size N`, so
  at most N finished conversations keep their KV cache for reuse. A
  quantized KV cache disables batching in mlx_lm.server, so more than one
  slot with one is refused.
* `batchSize` -> `--prefill-step-size` (how many prompt tokens one step
  processes; the same 2048 default as llama-server's batch).
* `jinja`: the tokenizer's chat template is always applied; `false` is
  refused. A different template (`--chat-template`, `--chat-template-args`)
  and sampling defaults (`--temp`, `--top-p`, `--top-k`, `--min-p`,
  `--max-tokens`) are mlx_lm.server options that `extraArgs` may carry.
* The installed mlx-lm (`LaunchSettings.mlx_dialect`, read from its
  `--help` at start-up): the options above appeared in 0.30.6 to 0.32.0
  (`core.mlx_dialect.OPTION_SINCE`); for an older server the command line
  leaves out those it lacks, and a spec that needs one (more slots, another
  batchSize, a quantized cache) is refused naming the release.
* `extraArgs` come last (argparse: the last occurrence wins), allowlisted by
  `core.mlx_options` (every option of mlx_lm.server classified; argparse's
  abbreviations and `--opt=value` resolved as argparse would).
* `speculativeDecoding` of type `draft` (or `draft-simple`) with
  `draftModelRef` naming an MLX Model in the same namespace ->
  `--draft-model <its directory>` and `nDraftMax` -> `--num-draft-tokens`.
  The draft is fetched and checked like the served model and its memory is
  admitted with it; a draft makes mlx_lm.server serve one request at a
  time, so more slots are refused, as are the other speculation types and a
  draft named as a file (`draftModel`). Every llama-server-only field (rope
  scaling, MoE offload, tensor/metadata overrides, reasoning budget,
  uBatchSize, embedding and rerank modes, GPU layer counts and sharding, a
  sha256 for a whole directory) is refused by path, never silently dropped.

One model per server: a request to mlx_lm.server may name another model,
adapters or a draft model in its body (`model`, `adapters`, `draft_model`),
and the server would load it, from the hub or from any directory the
agent's user can read, replacing the one it serves. OpenAI clients send a
`model` name with every request, so plain mlx_lm.server would also fail
them. The agent therefore starts it through `ONE_MODEL`, a few lines run by
the same interpreter (`python -c`) that make every request use the model the
server was started with, as llama-server does, before calling mlx_lm's own
`main()` with the same arguments.

Readiness: mlx_lm.server answers /health 200 as soon as its HTTP server is up,
while the model is still loading in its generation thread (and 503 once that
thread has died, e.g. of a broken model). So readiness is one 1-token
completion, which the server only answers once the model is loaded; /health
stays the liveness probe.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from fractions import Fraction

from metal_agent.core.api import InferenceServiceSpec, Mode, Model, ModelFormat, SourceKind, UNQUANTIZED_CACHE_TYPES
from metal_agent.core.engine import ModelReader, Probe
from metal_agent.core.engine_name import EngineName
from metal_agent.core.extra_args import OptionTable
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.llama_log import Acceleration
from metal_agent.core.memory import EstimateFailed, MemoryEstimate, overhead_bytes
from metal_agent.core.mlx_dialect import refusals as version_refusals
from metal_agent.core.mlx_dialect import supported
from metal_agent.core.mlx_options import MLX_LM_OPTIONS
from metal_agent.core.result import FieldError
from metal_agent.core.workload import Workload

MODEL_KIND = "Model"
ISVC_KIND = "InferenceService"

#: speculativeDecoding types mlx_lm.server runs (with a draft Model), and the ones that mean "none".
DRAFT_TYPES = ("draft", "draft-simple")
NO_SPECULATION = ("none", "disabled")

#: `cacheType*` -> `--kv-bits`.
KV_BITS = {"q8_0": 8, "q4_0": 4}
KV_GROUP_SIZE = 64  # mlx_lm's default group: one scale and one bias (model dtype) per 64 values
KV_STEP = 256  # MLX grows a KV cache in steps of 256 tokens
MAX_CONFIG_BYTES = 4 << 20
# safetensors headers are JSON, parsed by one C call that holds the GIL (the
# agent's event loop waits for it): ~10 ms a MiB. Real shards: ~100 KB each,
# a few MB for the largest models in all.
MAX_SAFETENSORS_HEADER = 16 << 20  # one shard
MAX_SAFETENSORS_HEADERS = 64 << 20  # all shards of a model

#: Fields only llama-server has, refused with this reason.
_LLAMA_ONLY = "a llama-server option; mlx_lm.server has no equivalent, so it cannot be honoured"

# A Python traceback's last line ("ValueError: ..."), logged errors, a dead generation thread.
_PROBLEM = re.compile(r"^\w*(?:Error|Exception)\b|\b(?:ERROR|CRITICAL|error|died|failed|cannot|No such file)\b")


#: Run by mlx-lm's own interpreter in place of the `mlx_lm.server` script (see the module docstring).
ONE_MODEL = (
    "import sys\n"
    "import mlx_lm.server as server\n"
    "load = server.ModelProvider.load\n"
    "def one_model(self, model_path, adapter_path=None, draft_model_path=None):\n"
    "    return load(self, 'default_model', None, 'default_model')\n"
    "server.ModelProvider.load = one_model\n"
    "sys.argv[0] = 'mlx_lm.server'\n"
    "server.main()\n"
)


def _cache_bits(spec: InferenceServiceSpec) -> int | None:
    """`--kv-bits` for a spec that passed `refusals` (None: the model's own dtype)."""
    return KV_BITS.get(spec.effective_cache_type_k or "")


@dataclass(frozen=True)
class MlxLm:
    name: EngineName = EngineName.MLX_LM
    display: str = "mlx_lm.server"
    runtime_label: str = "mlx"  # LLMKube has no MLX pods; the Model format's name
    probe: Probe = Probe(health_path="/health", ready_path="/v1/completions",
                         ready_body=json.dumps({"prompt": "ok", "max_tokens": 1}))
    directory_model: bool = True
    options: OptionTable = MLX_LM_OPTIONS

    # -- what it honours ----------------------------------------------------

    def wants_draft(self, spec: InferenceServiceSpec) -> bool:
        return spec.speculative_type in DRAFT_TYPES and spec.draft_model_ref is not None

    def draft_refusals(self, draft: Model) -> tuple[FieldError, ...]:
        """A draft Model is an MLX directory like any other (mlx_lm.server loads it with `load`)."""
        errors = list(_model_refusals(draft))
        if draft.spec.format is not ModelFormat.MLX and not any(e.path == "spec.format" for e in errors):
            errors.append(FieldError("spec.format", f"{draft.spec.format.value} cannot be a draft model for"
                                     " mlx_lm.server, which loads MLX directories only; use format mlx",
                                     MODEL_KIND, draft.meta.key))
        return tuple(errors)

    def refusals(self, workload: Workload) -> tuple[FieldError, ...]:
        spec = workload.isvc.spec
        errors: list[FieldError] = list(_model_refusals(workload.model))

        def isvc_error(path: str, message: str) -> None:
            errors.append(FieldError(path, message, ISVC_KIND, workload.isvc.meta.key))

        k, v = spec.effective_cache_type_k, spec.effective_cache_type_v
        for field, value in (("cacheTypeK", k), ("cacheTypeV", v)):
            custom = getattr(spec, f"cache_type_custom_{field[-1].lower()}")
            path = f"spec.cacheTypeCustom{field[-1]}" if custom else f"spec.{field}"
            if value is None or value in KV_BITS or value in ("f16", "bf16"):
                continue
            reason = ("MLX keeps an unquantized KV cache in the model's own dtype" if value in UNQUANTIZED_CACHE_TYPES
                      else "mlx_lm.server quantizes the KV cache to 8 or 4 bits only (--kv-bits)")
            isvc_error(path, f"{value!r} cannot be honoured: {reason}; use q8_0, q4_0, f16 or leave it unset")
        if (k in KV_BITS or v in KV_BITS) and KV_BITS.get(k or "") != KV_BITS.get(v or ""):
            isvc_error("spec.cacheTypeV", f"MLX quantizes keys and values together (one --kv-bits), so cacheTypeK"
                       f" ({k or 'unset'}) and cacheTypeV ({v or 'unset'}) must be the same q8_0 or q4_0")
        elif k in KV_BITS and spec.parallel_slots > 1:
            isvc_error("spec.parallelSlots", f"{spec.parallel_slots} slots cannot be honoured with a quantized KV"
                       " cache: mlx_lm.server's --kv-bits disables batching (one request at a time); use 1, or an"
                       " unquantized cache")

        if spec.rope_scaling is not None:
            isvc_error("spec.ropeScaling", "mlx_lm reads rope scaling from the model's config.json; it cannot be"
                       " set per service")
        if not spec.flash_attention:
            isvc_error("spec.flashAttention", "false cannot be honoured: MLX always uses its fused attention")
        if spec.jinja is False:
            isvc_error("spec.jinja", "false cannot be honoured: mlx_lm.server always applies the tokenizer's chat"
                       " template (give another with extraArgs --chat-template)")
        if spec.mode is not Mode.CHAT:
            isvc_error("spec.mode", f"{spec.mode.value} cannot be served: mlx_lm.server serves chat and text"
                       " completions only")
        llama_only = (
            ("spec.moeCPUOffload", spec.moe_cpu_offload), ("spec.moeCPULayers", spec.moe_cpu_layers > 0),
            ("spec.noKvOffload", spec.no_kv_offload), ("spec.tensorOverrides", bool(spec.tensor_overrides)),
            ("spec.metadataOverrides", bool(spec.metadata_overrides)),
            ("spec.reasoningBudget", spec.reasoning_budget is not None),  # 0 means "no thinking" too
            ("spec.reasoningBudgetMessage", bool(spec.reasoning_budget_message)),
            ("spec.uBatchSize", spec.ubatch_size is not None),
        )
        for path, is_set in llama_only:
            if is_set:
                isvc_error(path, _LLAMA_ONLY)
        kind = spec.speculative_type
        if kind in DRAFT_TYPES and spec.draft_model_file is not None:
            isvc_error("spec.speculativeDecoding.draftModel", "names a file in the Model's spec.files, which an MLX"
                       " directory does not have; give the draft as its own MLX Model in draftModelRef")
        elif kind in DRAFT_TYPES and spec.draft_model_ref is None:
            isvc_error("spec.speculativeDecoding.draftModelRef", f"type {kind} needs a draft model: name an MLX Model"
                       " in the same namespace")
        elif kind not in (None, *NO_SPECULATION, *DRAFT_TYPES):
            isvc_error("spec.speculativeDecoding.type", f"{kind!r} cannot be honoured: mlx_lm.server speculates with"
                       " a draft model only (type draft with draftModelRef)")
        elif kind in DRAFT_TYPES and spec.parallel_slots > 1:
            isvc_error("spec.parallelSlots", f"{spec.parallel_slots} slots cannot be honoured with a draft model:"
                       " mlx_lm.server then serves one request at a time; use 1")
        if kind in DRAFT_TYPES and spec.draft_p_min is not None:
            isvc_error("spec.speculativeDecoding.pMin", "cannot be honoured: mlx_lm.server has no minimum draft"
                       " probability (it drafts nDraftMax tokens every step); remove it")
        return tuple(errors)

    def server_refusals(self, workload: Workload, settings: LaunchSettings) -> tuple[FieldError, ...]:
        """What the installed mlx-lm is too old for (core.mlx_dialect: the option's first release)."""
        spec = workload.isvc.spec
        return version_refusals(spec, settings.mlx_dialect, workload.isvc.meta.key,
                                quantized_cache=_cache_bits(spec) is not None)

    # -- the command line ----------------------------------------------------

    def argv(self, workload: Workload, settings: LaunchSettings, instance: Instance) -> tuple[str, ...]:
        spec = workload.isvc.spec
        found = settings.command(self.name)
        if not found:
            raise ValueError("mlx_lm.server was not found; the caller must not build its command line")
        # (interpreter, script): run the script's module through ONE_MODEL; a binary runs as it is.
        command = [found[0], "-c", ONE_MODEL] if len(found) == 2 else list(found)
        argv = [*command, "--model", instance.model_path, "--host", settings.host, "--port", str(instance.port),
                "--log-level", "INFO",
                "--decode-concurrency", str(spec.parallel_slots),
                "--prompt-cache-size", str(spec.parallel_slots),
                "--prefill-step-size", str(spec.batch_size)]
        if (bits := _cache_bits(spec)) is not None:
            argv += ["--kv-bits", str(bits), "--kv-group-size", str(KV_GROUP_SIZE), "--quantized-kv-start", "0"]
        if workload.draft is not None and instance.draft_model_path:
            argv += ["--draft-model", instance.draft_model_path]
            if spec.draft_tokens is not None:
                argv += ["--num-draft-tokens", str(spec.draft_tokens)]
        # Only what the installed server accepts: an older one stops on an unknown option, and a spec
        # that needs a missing one was refused (server_refusals). The owner's extraArgs go as they are.
        return (*supported(tuple(argv), settings.mlx_dialect), *spec.extra_args)

    # -- its log ---------------------------------------------------------------

    def acceleration(self, log_text: str) -> Acceleration | None:
        return None  # mlx_lm.server does not log where the model landed (MLX puts it all on the GPU)

    def problem_lines(self, log_text: str, limit: int = 5) -> list[str]:
        lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
        problems = [ln for ln in lines if _PROBLEM.search(ln) and "UserWarning" not in ln]
        return problems[-limit:] if problems else lines[-limit:]

    # -- memory ------------------------------------------------------------------

    def estimate_inputs(self, reader: ModelReader) -> MlxInputs | EstimateFailed:
        """The weights (safetensors headers) and the KV shape (config.json): what any service's
        estimate of this directory needs."""
        try:
            names = reader.names()
            if "config.json" not in names:
                return EstimateFailed(f"{reader.where} has no config.json; an MLX model directory holds config.json,"
                                      " *.safetensors weights and tokenizer files")
            size = reader.size("config.json")
            if size > MAX_CONFIG_BYTES:
                return EstimateFailed(f"config.json in {reader.where} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
            config = _json(reader.read("config.json", 0, size))
            if config is None:
                return EstimateFailed(f"config.json in {reader.where} is not a JSON object")
            weights = 0
            shards = sorted(n for n in names if n.endswith(".safetensors"))
            if not shards:
                return EstimateFailed(f"{reader.where} has no *.safetensors weights")
            headers = MAX_SAFETENSORS_HEADERS
            for shard in shards:
                tensor_bytes = _safetensors_bytes(reader, shard, headers)
                if isinstance(tensor_bytes, str):
                    return EstimateFailed(tensor_bytes)
                weights += tensor_bytes[0]
                headers -= tensor_bytes[1]
        except OSError as err:
            return EstimateFailed(f"cannot read the MLX model in {reader.where}: {reader.explain(err)}")
        shape = _kv_shape(config)
        if isinstance(shape, str):
            return EstimateFailed(f"config.json in {reader.where}: {shape}")
        trained = config.get("max_position_embeddings")
        trained = trained if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0 else None
        return MlxInputs(weights, *shape, trained)

    def estimate_with(self, inputs: MlxInputs | EstimateFailed, spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
        """weights + KV cache (context, slots) + overhead.

        KV: per token, layers x kv_heads x (key + value head dim) x bytes per
        value, the context padded to MLX's 256-token step, times
        2 x parallelSlots: the conversations being decoded plus as many kept
        in the prompt cache (`--prompt-cache-size`). Bytes per value: the
        model's dtype (4 for float32, else 2), or with `--kv-bits b` b/8 plus
        a scale and a bias per group of 64.
        """
        if isinstance(inputs, EstimateFailed):
            return inputs
        weights = inputs.weights_bytes
        bits = _cache_bits(spec)
        per_value = (Fraction(bits, 8) + Fraction(2 * inputs.dtype_bytes, KV_GROUP_SIZE) if bits
                     else Fraction(inputs.dtype_bytes))
        context = max(KV_STEP, math.ceil(spec.context_size / KV_STEP) * KV_STEP)
        per_token = inputs.layers * inputs.kv_heads * 2 * inputs.head_dim * per_value
        kv = math.ceil(per_token * context * 2 * spec.parallel_slots)
        cache_name = spec.effective_cache_type_k if bits else inputs.dtype_name
        notes = ()
        if inputs.trained is not None and inputs.trained < spec.context_size:
            notes = (f"contextSize {spec.context_size} is beyond the model's trained context {inputs.trained}",)
        return MemoryEstimate(weights_bytes=weights, kv_bytes=kv, overhead_bytes=overhead_bytes(weights),
                              context=context, cache_type_k=cache_name, cache_type_v=cache_name, notes=notes)

    def estimate(self, reader: ModelReader, spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
        return self.estimate_with(self.estimate_inputs(reader), spec)


@dataclass(frozen=True, slots=True)
class MlxInputs:
    """An MLX model's estimate inputs (small, cacheable by the directory's identity)."""

    weights_bytes: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    dtype_name: str
    trained: int | None  # max_position_embeddings


def _model_refusals(model: Model) -> tuple[FieldError, ...]:
    """What mlx_lm.server cannot honour in a Model it loads (the served one or a draft)."""
    errors: list[FieldError] = []

    def model_error(path: str, message: str) -> None:
        errors.append(FieldError(path, message, MODEL_KIND, model.meta.key))

    source = model.spec.source
    tail = source.raw.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    if tail.lower().endswith(".gguf"):
        model_error("spec.format", f"mlx names an MLX model directory, but spec.source {source.raw!r} is a GGUF"
                    " file; use format gguf (served by llama-server) or point spec.source at an MLX directory")
    elif source.kind is SourceKind.HTTP:
        model_error("spec.source", "an MLX model is a directory, which a single http(s):// URL cannot name; use"
                    " hf://org/repo[@revision], file:///path/to/dir or an absolute directory path")
    elif source.kind is SourceKind.HUGGINGFACE:
        repo = tail.split("://", 1)[1]
        if len([p for p in repo.split("/") if p]) != 2:
            model_error("spec.source", "an MLX model from the hub is a whole repository: write"
                        " hf://org/repo or hf://org/repo@revision, without a file path")
    if model.spec.files or model.spec.mmproj:
        model_error("spec.files" if model.spec.files else "spec.mmproj", "an MLX model is fetched as a whole"
                    " directory or repository (spec.source); files and mmproj name GGUF files for llama-server")
    if model.spec.sha256:
        model_error("spec.sha256", "an MLX model is a directory of files, which has no single sha256; remove"
                    " it (hub downloads are verified file by file against the sizes and hashes the hub lists)")
    gpu = model.spec.hardware.gpu
    if gpu.layers != 0:
        model_error("spec.hardware.gpu.layers", f"MLX runs every layer on the GPU; {gpu.layers} cannot be"
                    " honoured (remove it or set 0)")
    if gpu.sharding is not None:
        model_error("spec.hardware.gpu.sharding", "MLX on one Mac does not split a model across devices")
    return tuple(errors)


def _json(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        return None
    return value if isinstance(value, dict) else None


def _safetensors_bytes(reader: ModelReader, name: str, budget: int = MAX_SAFETENSORS_HEADERS) -> tuple[int, int] | str:
    """(bytes of tensor data the shard's header lists, the header's length), or what is wrong.
    `budget`: header bytes the model's shards may still take."""
    size = reader.size(name)
    head = reader.read(name, 0, 8)
    if len(head) < 8:
        return f"{name} is not a safetensors file (shorter than its 8-byte header length)"
    (length,) = struct.unpack("<Q", head)
    if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        return f"{name} is not a safetensors file (header length {length} does not fit the file)"
    if length > budget:
        return (f"{name}: the safetensors headers of this model take more than {MAX_SAFETENSORS_HEADERS >> 20} MiB,"
                " far more than any real model's; not reading them")
    header = _json(reader.read(name, 8, length))
    if header is None:
        return f"{name} is not a safetensors file (its header is not a JSON object)"
    end = 0
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[1] < offsets[0]):
            return f"{name}: tensor {tensor!r} has no usable data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end > size:
        return f"{name} is shorter than its header says ({size} bytes, header lists {8 + length + end})"
    return end, length


def _positive(config: dict, key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _kv_shape(config: dict) -> tuple[int, int, int, int, str] | str:
    """(layers, kv heads, head dim, bytes per value, dtype name) from config.json, or the problem."""
    if _positive(config, "num_hidden_layers") is None and isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}  # vision-language models nest the language model's shape
    layers = _positive(config, "num_hidden_layers")
    heads = _positive(config, "num_attention_heads")
    hidden = _positive(config, "hidden_size")
    if layers is None:
        return "no usable num_hidden_layers"
    if heads is None:
        return "no usable num_attention_heads"
    kv_heads = _positive(config, "num_key_value_heads") or heads
    head_dim = _positive(config, "head_dim") or (hidden // heads if hidden else None)
    if not head_dim:
        return "neither head_dim nor hidden_size gives the head dimension"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    if dtype in ("float32", "fp32"):
        return layers, kv_heads, head_dim, 4, "f32"
    return layers, kv_heads, head_dim, 2, "bf16" if dtype == "bfloat16" else "f16"


MLX_LM = MlxLm()
