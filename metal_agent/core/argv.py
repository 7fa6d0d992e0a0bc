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
* `reasoningBudget` 0 is omitted (LLMKube's rule), although llama-server
  reads an explicit 0 as "no thinking"; the message is sent when non-empty.
"""

from __future__ import annotations

from metal_agent.core.api import InferenceServiceSpec, Mode, ModelSpec, ShardingStrategy
from metal_agent.core.flags import LOG_VERBOSITY
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.workload import Workload

#: What "all layers" is sent as; see the module docstring.
ALL_LAYERS = "999"

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
    argv += ["--ctx-size", str(spec.context_size)]
    argv += _rope_args(spec)
    if spec.parallel_slots > 1:
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
    for override in spec.tensor_overrides:
        argv += ["--override-tensor", override]
    for override in spec.metadata_overrides:
        argv += ["--override-kv", override]
    if settings.threads is not None:
        argv += ["--threads", str(settings.threads)]
    argv += ["--batch-size", str(spec.batch_size)]
    if spec.ubatch_size is not None:
        argv += ["--ubatch-size", str(spec.ubatch_size)]
    if spec.no_warmup:
        argv.append("--no-warmup")
    if spec.reasoning_budget > 0:
        argv += ["--reasoning-budget", str(spec.reasoning_budget)]
    if spec.reasoning_budget_message:
        argv += ["--reasoning-budget-message", spec.reasoning_budget_message]
    if spec.jinja:
        argv.append("--jinja")
    elif spec.jinja is False and dialect.no_jinja:
        argv.append("--no-jinja")
    argv += _mode_args(spec.mode)
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
