"""Typed, immutable views of LLMKube's `Model` and `InferenceService`.

These classes hold *normalised* values: LLMKube's defaults are already
applied, enums are enums, empty strings that mean "unset" are `None`. Two
manifests that mean the same thing therefore compare (and hash) equal,
whatever their key order or whether they spelled a default out.

They are built only by `metal_agent.core.model_validation` and `core.isvc_validation`, which guarantee the
invariants documented on each field; nothing here re-checks them.
Frozen dataclasses and tuples make a parsed spec safe to share between
asyncio tasks and to use as a dict key.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from urllib.parse import unquote, urlsplit

from metal_agent.core.lifecycle import Lifetime, RolloutPolicy

# ---------------------------------------------------------------------------
# Enums: the value sets of LLMKube's CRDs (see docs/llmkube-compat.md).
# ---------------------------------------------------------------------------


class Accelerator(StrEnum):
    CPU = "cpu"
    METAL = "metal"
    CUDA = "cuda"
    ROCM = "rocm"
    INTEL = "intel"
    VULKAN = "vulkan"


class ModelFormat(StrEnum):
    GGUF = "gguf"
    MLX = "mlx"
    SAFETENSORS = "safetensors"
    PYTORCH = "pytorch"
    CUSTOM = "custom"


class ShardingStrategy(StrEnum):
    LAYER = "layer"
    TENSOR = "tensor"
    ROW = "row"
    PIPELINE = "pipeline"
    NONE = "none"


class Runtime(StrEnum):
    LLAMACPP = "llamacpp"
    LLAMACPP_ROUTER = "llamacpp-router"
    PERSONAPLEX = "personaplex"
    VLLM = "vllm"
    TGI = "tgi"
    SGLANG = "sglang"
    GENERIC = "generic"


class CacheType(StrEnum):
    """The KV cache types LLMKube's enum admits (`cacheTypeK`/`cacheTypeV`)."""

    F16 = "f16"
    F32 = "f32"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    IQ4_NL = "iq4_nl"


#: KV cache types that are plain floats; anything else is quantized.
UNQUANTIZED_CACHE_TYPES = frozenset({"f16", "f32", "bf16"})


class RopeScalingType(StrEnum):
    LINEAR = "linear"
    YARN = "yarn"
    LONGROPE = "longrope"


class Mode(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"
    RERANK = "rerank"


class Priority(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"
    BATCH = "batch"


class SourceKind(StrEnum):
    """How `Model.spec.source` names the weights; decides who fetches them."""

    HTTP = "http"  # http:// or https:// URL, downloaded by the agent
    FILE = "file"  # file:// URL to a file on this Mac
    PATH = "path"  # absolute path to a file on this Mac
    HUGGINGFACE = "hf"  # hf://org/repo[/file]
    PVC = "pvc"  # pvc://claim/path, only meaningful inside the cluster
    S3 = "s3"  # s3://bucket/key
    NAME = "name"  # bare catalogue name


# ---------------------------------------------------------------------------
# Object identity
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """Who an object is, and which revision of it we parsed.

    `generation` moves on spec changes only; `resource_version` on any write
    (status included). Both are kept so callers can tell the two apart.
    Absent on objects read from a local YAML file, hence optional.
    """

    namespace: str
    name: str
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSource:
    """`spec.source`, classified. `raw` is the string exactly as written."""

    raw: str
    kind: SourceKind

    @property
    def local_path(self) -> str | None:
        """The file on this Mac, for `file://` and absolute-path sources."""
        if self.kind is SourceKind.PATH:
            return self.raw
        if self.kind is SourceKind.FILE:
            # file:///Users/me/My%20Models/m.gguf names ".../My Models/m.gguf".
            return unquote(urlsplit(self.raw).path)
        return None

    @property
    def file_name(self) -> str:
        """Last path segment (query and fragment dropped), for cache file names."""
        tail = self.raw.split("?", 1)[0].split("#", 1)[0].rstrip("/")
        return tail.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class ShardingSpec:
    """`spec.hardware.gpu.sharding`.

    `layer_split` holds the per-device proportions as exact decimals (the
    wire type is a string list), so "1" and "1.0" are the same proportion.
    Invariant: not all zero, and as long as `gpu.count` when both are set.
    """

    strategy: ShardingStrategy | None = None
    layer_split: tuple[Decimal, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """`spec.hardware.gpu`.

    `layers` keeps LLMKube's meaning: 0 (also when unset) is "all layers",
    -1 is "let llama-server decide", N > 0 offloads N layers.
    """

    layers: int = 0
    count: int | None = None
    sharding: ShardingSpec | None = None


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    accelerator: Accelerator = Accelerator.CPU
    gpu: GpuSpec = GpuSpec()
    memory_budget_bytes: int | None = None
    memory_fraction: float | None = None


@dataclass(frozen=True, slots=True)
class SecretRef:
    """`spec.sourceSecretRef`: a Secret in the Model's namespace holding a bearer token for the download."""

    name: str
    key: str = "token"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    source: ModelSource
    sha256: str | None = None  # lower-case hex when set
    format: ModelFormat = ModelFormat.GGUF
    hardware: HardwareSpec = HardwareSpec()
    source_secret_ref: SecretRef | None = None
    # `files[0]` is the file the engine loads; the rest and `mmproj` lie beside it (core.companion_files).
    files: tuple[str, ...] = ()
    mmproj: str | None = None


@dataclass(frozen=True, slots=True)
class Model:
    meta: ObjectMeta
    spec: ModelSpec


# ---------------------------------------------------------------------------
# InferenceService
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """`spec.ropeScaling`; each part maps to its own llama-server flag.

    `factor` is the canonical decimal string (the wire type is a string so
    that the CRD never rounds it), e.g. "4" for both "4" and "4.0".
    """

    type: RopeScalingType | None = None
    factor: str | None = None
    original_context: int | None = None


@dataclass(frozen=True, slots=True)
class InferenceServiceSpec:
    """`InferenceService.spec` with the defaults LLMKube's Metal agent applies.

    Fields whose flag is "omitted when unset" stay `None` (or empty), so the
    argv builder can tell "unset" from any explicit value.
    """

    model_ref: str
    replicas: int = 1
    suspend: bool = False
    runtime: Runtime = Runtime.LLAMACPP
    context_size: int = 2048
    rope_scaling: RopeScaling | None = None
    parallel_slots: int = 1
    flash_attention: bool = True
    # None: unset, llama-server's own default applies (the Jinja engine is on
    # in current builds); False asks for it off (`--no-jinja`), True on.
    jinja: bool | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    cache_type_custom_k: str | None = None
    cache_type_custom_v: str | None = None
    moe_cpu_offload: bool = False
    moe_cpu_layers: int = 0
    no_kv_offload: bool = False
    no_warmup: bool = False
    reasoning_budget: int | None = None  # None: unset (LLMKube's nil); 0 is "no thinking", said out loud
    reasoning_budget_message: str | None = None
    metadata_overrides: tuple[str, ...] = ()
    tensor_overrides: tuple[str, ...] = ()
    batch_size: int = 2048
    ubatch_size: int | None = None
    extra_args: tuple[str, ...] = ()
    mode: Mode = Mode.CHAT
    priority: Priority = Priority.NORMAL
    eviction_protection: bool = False
    # `speculativeDecoding`: read leniently (LLMKube's CRD validates it); each engine honours
    # what it can run and refuses the rest by name (core.engines.*.refusals). Hashed through the
    # draft Model a workload carries (core.workload.Workload.draft) and, for llama-server, the
    # resolved type, nDraftMax and pMin (core.spec_hash).
    speculative_type: str | None = None
    draft_model_ref: str | None = None  # speculativeDecoding.draftModelRef: a Model in the same namespace
    draft_model_file: str | None = None  # speculativeDecoding.draftModel: a file in the Model's spec.files
    draft_tokens: int | None = None  # speculativeDecoding.nDraftMax
    draft_p_min: float | None = None  # speculativeDecoding.pMin
    # When a running process may be replaced (core.lifecycle); not hashed: changing them respawns nothing.
    rollout_policy: RolloutPolicy | None = None
    lifetime: Lifetime = Lifetime()

    @property
    def effective_cache_type_k(self) -> str | None:
        """The custom type wins over the enum one, as in LLMKube."""
        return self.cache_type_custom_k or (self.cache_type_k.value if self.cache_type_k else None)

    @property
    def effective_cache_type_v(self) -> str | None:
        return self.cache_type_custom_v or (self.cache_type_v.value if self.cache_type_v else None)

    @property
    def quantized_cache_v(self) -> bool:
        """The V cache holds a quantized type (q8_0, q4_0, turbo3, ...), which needs Flash Attention.

        Only f16, f32 and bf16 are plain floating-point caches; every other
        type llama.cpp or a fork knows is block-quantized.
        """
        cache_v = self.effective_cache_type_v
        return cache_v is not None and cache_v not in UNQUANTIZED_CACHE_TYPES

    @property
    def wants_process(self) -> bool:
        """Only zero versus non-zero replicas matters: one process per service per Mac."""
        return self.replicas > 0 and not self.suspend


@dataclass(frozen=True, slots=True)
class InferenceService:
    meta: ObjectMeta
    spec: InferenceServiceSpec
