"""The llama-server command line for one validated workload.

Pure: everything that needs the outside world (which port is free, where the
model file was cached, how many performance cores the Mac has, which flag
dialect the binary speaks) is decided by the caller and passed in as the
agent's `LaunchSettings` and the process's `Instance` (`core.launch`). The
spec side comes from `Workload`, already validated, so this module never has
to reject anything.

Flag order follows LLMKube's Metal agent, which keeps diffs against its
command lines readable; `extraArgs` come last so they can override any flag
the agent does not own (llama-server lets the last occurrence win).

Decisions worth knowing:

* `--n-gpu-layers`: Model `gpu.layers` 0 or unset means "all layers" and is
  sent as 999. LLMKube sends 99, which leaves layers on the CPU for models
  deeper than 99 layers; newer llama-server builds also accept `all`, but
  every build accepts an integer, and llama.cpp clamps it to the model's
  depth. -1 is passed through unchanged, as LLMKube does; current
  llama-server reads it as `auto` (fit the layers to free memory).
* Sharding: `strategy` maps to `--split-mode`; `pipeline` becomes `layer`,
  which is llama.cpp's pipelined split (layers and KV divided across devices).
  `layerSplit` becomes `--tensor-split`. A Mac has one GPU, so these matter
  only to forks or RPC setups, but they are passed faithfully.
* `--flash-attn`: `on` when unset (LLMKube's default), and an explicit `off`
  when the spec says false, rather than LLMKube's silence, which leaves
  llama-server on `auto` and can still turn it on. (`off` with a quantized
  V cache is refused by validation: llama-server would exit.)
* `--jinja` / `--no-jinja`: current llama-server enables the Jinja template
  engine by default, so `jinja: false` must be said out loud (`--no-jinja`)
  or it would mean "on"; unset says nothing and keeps the build's default.
  On a build without `--no-jinja` (engine off by default) false says nothing.
* `--verbosity 4`: agent-owned, when the binary has the option (see
  `core.flags.LOG_VERBOSITY`): without it llama-server no longer logs where
  the model was loaded, and `status.acceleration` would stay empty.
* MoE: `moeCPUOffload` -> `--cpu-moe`, `moeCPULayers` > 0 -> `--n-cpu-moe N`,
  each on its own as in LLMKube.
* `--reasoning-budget N` whenever `reasoningBudget` is set, 0 included, and
  the message only with it: LLMKube's controller rule (`appendReasoningBudgetArgs`,
  `budget != nil`), which gives 0 the meaning its API documents ("disables
  visible thinking output"). LLMKube's Go Metal agent drops 0 (`> 0`); unset
  keeps llama-server's default (-1, unlimited).
* `--parallel N` is always sent, 1 included: without it current llama-server
  picks "auto" (`n_parallel = -1` in `common/arg.cpp`), which
  `tools/server/server.cpp` turns into 4 slots sharing one unified KV cache,
  not the one slot the spec asks for.
* `--cache-ram N` is always sent (unless `extraArgs` set it): llama-server
  keeps finished prompts' KV states in a host-RAM prompt cache of up to
  8192 MiB by default (`cache_ram_mib`, `common/common.h`), growing its token
  limit until the memory limit is reached (`server_prompt_cache::update`).
  On a Mac that is unified memory taken from the models, so the agent bounds
  it (`prompt_cache_mib`) and memory admission counts what it allows. It is 0
  for embedding and rerank, whose requests never read the cache (as LLMKube).
* `tensorOverrides` / `metadataOverrides`: one `--override-tensor` and one
  `--override-kv`, items joined with commas (`str:` values holding a comma
  quoted): see `core.llama_overrides` for how build 11434 reads them.
* `speculativeDecoding` -> `--spec-type` (LLMKube's aliases resolved: `draft`
  is `draft-simple`, `mtp` is `draft-mtp`, `disabled` is `none`), `-md` with
  the draft Model's file for the types that take draft weights,
  `--spec-draft-n-max`, `--spec-draft-p-min` (spellings and type names of
  build 11434: `common/arg.cpp`, `common/speculative.cpp`).
"""

from __future__ import annotations

from metal_agent.core.api import InferenceServiceSpec, Mode, ModelSpec, ShardingStrategy
from metal_agent.core.companion_files import mmproj_path, path_of
from metal_agent.core.extra_args import arity
from metal_agent.core.flags import LOG_VERBOSITY
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.llama_options import LLAMA_SERVER_OPTIONS
from metal_agent.core.llama_overrides import kv_overrides_value, tensor_overrides_value
from metal_agent.core.workload import Workload

#: What "all layers" is sent as; see the module docstring.
ALL_LAYERS = "999"

#: The host prompt cache a chat service gets, in MiB (llama-server's own default is 8192, which
#: memory admission would have to count for every service: too much for most Macs). `extraArgs`
#: `--cache-ram N` sets another size, counted as given.
DEFAULT_PROMPT_CACHE_MIB = 1024
CACHE_RAM = "--cache-ram"

#: `--spec-type` names of the pinned build (`common_speculative_type_from_name_map`), and LLMKube's aliases.
SPEC_TYPES = ("none", "draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark",
              "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
SPEC_TYPE_ALIASES = {"mtp": "draft-mtp", "draft": "draft-simple", "disabled": "none"}
#: Types that run a draft model: all need its weights but `draft-mtp`, whose head may be in the model itself.
DRAFT_WEIGHT_TYPES = ("draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark")
NEEDS_DRAFT_WEIGHTS = tuple(t for t in DRAFT_WEIGHT_TYPES if t != "draft-mtp")

_SPLIT_MODE = {
    ShardingStrategy.NONE: "none",
    ShardingStrategy.LAYER: "layer",
    ShardingStrategy.PIPELINE: "layer",
    ShardingStrategy.ROW: "row",
    ShardingStrategy.TENSOR: "tensor",
}


def build_argv(workload: Workload, settings: LaunchSettings, instance: Instance) -> tuple[str, ...]:
    """The full argv (argv[0] is the binary) to serve `workload`.

    Of the agent's settings it reads the binary, the host, threads, mlock and
    the binary's dialect: `mlock_style` is the mlock spelling it understands,
    `verbosity_flag` its log-verbosity option (None: it has none, nothing is
    passed), `no_jinja` whether it knows `--no-jinja`, `no_slots` whether to
    pass `--no-slots`.
    """
    spec = workload.isvc.spec
    model = workload.model.spec
    dialect = settings.dialect
    argv: list[str] = [
        settings.llama_server,
        "--model", instance.model_path,
        "--host", settings.host,
        "--port", str(instance.port),
        "--n-gpu-layers", _gpu_layers(model),
    ]
    argv += _split_args(model)
    if mmproj := mmproj_path(model, instance.model_path):
        argv += ["--mmproj", mmproj]
    argv += ["--ctx-size", str(spec.context_size)]
    argv += _rope_args(spec)
    argv += ["--parallel", str(spec.parallel_slots)]
    argv += ["--flash-attn", "on" if spec.flash_attention else "off"]
    if settings.mlock:
        argv += dialect.mlock_style.args()
    if cache_k := spec.effective_cache_type_k:
        argv += ["--cache-type-k", cache_k]
    if cache_v := spec.effective_cache_type_v:
        argv += ["--cache-type-v", cache_v]
    if spec.moe_cpu_offload:
        argv.append("--cpu-moe")
    if spec.moe_cpu_layers > 0:
        argv += ["--n-cpu-moe", str(spec.moe_cpu_layers)]
    if spec.no_kv_offload:
        argv.append("--no-kv-offload")
    if spec.tensor_overrides:  # each option once: repeated, build 11434 logs "only last value will be used"
        argv += ["--override-tensor", tensor_overrides_value(spec.tensor_overrides)]
    if spec.metadata_overrides:
        argv += ["--override-kv", kv_overrides_value(spec.metadata_overrides)]
    if settings.threads is not None:
        argv += ["--threads", str(settings.threads)]
    argv += ["--batch-size", str(spec.batch_size)]
    if spec.ubatch_size is not None:
        argv += ["--ubatch-size", str(spec.ubatch_size)]
    if spec.no_warmup:
        argv.append("--no-warmup")
    if spec.reasoning_budget is not None:
        argv += ["--reasoning-budget", str(spec.reasoning_budget)]
        if spec.reasoning_budget_message:
            argv += ["--reasoning-budget-message", spec.reasoning_budget_message]
    # The draft is the workload's draft Model on this Mac, or a file of the Model's set (draftModel).
    draft = instance.draft_model_path if workload.draft is not None else None
    if draft is None and spec.draft_model_file and model.files:
        draft = path_of(model, instance.model_path, spec.draft_model_file)
    argv += _speculative_args(spec, draft)
    if spec.jinja:
        argv.append("--jinja")
    elif spec.jinja is False and dialect.no_jinja:
        argv.append("--no-jinja")
    argv += _mode_args(spec.mode)
    if extra_arg_value(spec.extra_args, CACHE_RAM) is None:
        argv += [CACHE_RAM, str(prompt_cache_mib(spec))]
    if dialect.no_slots:
        # /slots (on by default) shows every slot's prompt in flight to any client. /props
        # writes stay off: llama-server enables them only with --props, which extraArgs refuse.
        argv.append("--no-slots")
    argv.append("--metrics")
    if dialect.verbosity_flag:
        argv += [dialect.verbosity_flag, str(LOG_VERBOSITY)]
    argv += spec.extra_args
    return tuple(argv)


def _gpu_layers(model: ModelSpec) -> str:
    layers = model.hardware.gpu.layers
    return ALL_LAYERS if layers == 0 else str(layers)


def _split_args(model: ModelSpec) -> list[str]:
    sharding = model.hardware.gpu.sharding
    if sharding is None:
        return []
    args: list[str] = []
    if sharding.strategy is not None:
        args += ["--split-mode", _SPLIT_MODE[sharding.strategy]]
    if sharding.layer_split:
        args += ["--tensor-split", ",".join(format(p, "f") for p in sharding.layer_split)]
    return args


def _rope_args(spec: InferenceServiceSpec) -> list[str]:
    rope = spec.rope_scaling
    if rope is None:
        return []
    args: list[str] = []
    if rope.type is not None:
        # Passed as written; upstream llama-server knows linear and yarn,
        # and reads LongRoPE from the GGUF itself, so `longrope` only
        # works on builds that accept it and fails loudly elsewhere.
        args += ["--rope-scaling", rope.type.value]
    if rope.factor is not None:
        args += ["--rope-scale", rope.factor]
    if rope.original_context is not None:
        args += ["--yarn-orig-ctx", str(rope.original_context)]
    return args


def _mode_args(mode: Mode) -> list[str]:
    if mode is Mode.EMBEDDING:
        return ["--embedding", "--pooling", "last"]
    if mode is Mode.RERANK:
        return ["--reranking", "--embedding", "--pooling", "rank"]
    return []


def extra_arg_value(tokens: tuple[str, ...], name: str) -> str | None:
    """The value the last occurrence of option `name` (any spelling) has in checked extraArgs
    `tokens` (llama-server takes the last one), walking them as llama-server's parser does."""
    found, i = None, 0
    while i < len(tokens):
        spelling, inline = tokens[i], None
        if spelling.startswith("--") and "=" in spelling:  # as written, before extraArgs are normalised
            spelling, inline = spelling.split("=", 1)
        option = LLAMA_SERVER_OPTIONS.option(spelling)
        width = arity(option.value) if option is not None and inline is None else 0
        if option is not None and name in option.spellings:
            found = inline if inline is not None else (tokens[i + 1] if i + 1 < len(tokens) else found)
        i += 1 + width
    return found


def prompt_cache_mib(spec: InferenceServiceSpec) -> int:
    """The host prompt cache llama-server may fill for `spec`, in MiB (-1: no limit, refused by the
    engine): what `extraArgs` say, else 0 where no request reads it, else the agent's default."""
    given = extra_arg_value(spec.extra_args, CACHE_RAM)
    if given is not None:
        try:
            return int(given)
        except ValueError:
            pass  # not an integer: the extraArgs allowlist refuses it
    return 0 if spec.mode is not Mode.CHAT else DEFAULT_PROMPT_CACHE_MIB


def spec_type(spec: InferenceServiceSpec) -> str | None:
    """`speculativeDecoding.type` as llama-server spells it (None: no speculation); an unknown
    name comes back as written, for the engine to refuse."""
    written = spec.speculative_type
    resolved = SPEC_TYPE_ALIASES.get(written, written) if written else None
    return None if resolved in (None, "none") else resolved


def _speculative_args(spec: InferenceServiceSpec, draft_path: str | None) -> list[str]:
    kind = spec_type(spec)
    if kind is None:
        return []
    args = ["--spec-type", kind]
    if kind in DRAFT_WEIGHT_TYPES and draft_path:
        args += ["-md", draft_path]
    if spec.draft_tokens is not None:
        args += ["--spec-draft-n-max", str(spec.draft_tokens)]
    if spec.draft_p_min is not None:
        args += ["--spec-draft-p-min", repr(spec.draft_p_min).removesuffix(".0")]
    return args
