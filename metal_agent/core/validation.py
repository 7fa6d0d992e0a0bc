"""Turn the raw dicts the API server returns into typed specs, or list what is wrong.

The rules are LLMKube's CRD rules (so anything LLMKube's API server would
refuse is refused here too, which matters for manifests rendered offline and
for clusters whose CRDs lag behind) plus the agent's own safety rules: no
no characters that cannot travel in an argv
element, custom cache types limited to plain identifiers, no `..` in model
sources that become cache paths.

Design choices:

* Every check appends to one error list and parsing carries on with a
  harmless placeholder, so a manifest with five mistakes yields five errors.
* Fields LLMKube's CRDs have and the agent does not honour are refused when
  set (`core.fields`, reason `UnsupportedField`) or, where they configure
  what a Mac has no counterpart of, ignored as documented there. Fields no
  CRD of LLMKube's has are ignored: a field that cannot reach the API server
  through either CRD set can only come from a hand-written file.
* `null` is reported as a wrong type wherever we read a field. The API
  server prunes nulls before we see an object, so a null only ever comes
  from a hand-written manifest, where it usually means a forgotten value.
* `bool` is rejected where an integer belongs (Python's `True == 1` would
  otherwise turn `replicas: true` into one replica).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import unquote

from metal_agent.core import fields
from metal_agent.core.api import (
    Accelerator,
    CacheType,
    GpuSpec,
    HardwareSpec,
    InferenceService,
    InferenceServiceSpec,
    Mode,
    Model,
    ModelFormat,
    ModelSource,
    ModelSpec,
    ObjectMeta,
    Priority,
    RopeScaling,
    RopeScalingType,
    Runtime,
    SecretRef,
    ShardingSpec,
    ShardingStrategy,
    SourceKind,
)
from metal_agent.core.flags import CACHE_TYPE_TOKEN
from metal_agent.core.names import is_dns1123_label, is_dns1123_subdomain
from metal_agent.core.quantity import quantity_to_bytes
from metal_agent.core.result import FieldError, Invalid, Parsed

E = TypeVar("E", bound=StrEnum)

INT32_MAX = 2**31 - 1

MODEL_KIND = "Model"
ISVC_KIND = "InferenceService"
DEFAULT_NAMESPACE = "default"

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Plain non-negative decimals: what a human writes for a proportion or
# factor, and nothing llama-server's `stof` would read differently
# (no exponents, no hex, no inf/nan).
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_URL_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)", re.DOTALL)
_KV_OVERRIDE = re.compile(r"[^=\s]+=(int|float|bool|str):.*", re.DOTALL)

_SOURCE_SCHEMES = {
    "http": SourceKind.HTTP,
    "https": SourceKind.HTTP,
    "file": SourceKind.FILE,
    "hf": SourceKind.HUGGINGFACE,
    "pvc": SourceKind.PVC,
    "s3": SourceKind.S3,
}

#: Model formats no engine of the agent loads (GGUF: llama-server, MLX: mlx_lm.server);
#: `custom` is let through because it is how people label GGUF files with unusual names.
UNSERVABLE_FORMATS = frozenset({ModelFormat.SAFETENSORS, ModelFormat.PYTORCH})


class _Missing:
    """Marks a key that is absent (as opposed to present with value null)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def _describe(value: Any) -> str:
    """A short, safe rendering of an offending value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


class _Reader:
    """Reads fields of one object, collecting every problem with its path."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        self.errors: list[FieldError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message, self.kind, self.name))

    # -- structure ----------------------------------------------------------

    def get(self, obj: Mapping[str, Any] | None, key: str) -> Any:
        if obj is None:
            return MISSING
        return obj.get(key, MISSING)

    def mapping(
        self, obj: Mapping[str, Any] | None, key: str, path: str, *, required: bool = False
    ) -> Mapping[str, Any] | None:
        value = self.get(obj, key)
        if value is MISSING:
            if required:
                self.error(path, "required")
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"expected an object, got {_describe(value)}")
            return None
        return value

    # -- scalars ------------------------------------------------------------

    def integer(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        default: int,
        minimum: int | None = None,
        maximum: int = INT32_MAX,
    ) -> int:
        value = self.get(obj, key)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"expected an integer, got {_describe(value)}")
            return default
        if minimum is not None and value < minimum:
            self.error(path, f"must be at least {minimum}, got {value}")
            return default
        if value > maximum:
            self.error(path, f"must be at most {maximum}, got {value}")
            return default
        return value

    def optional_integer(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        minimum: int | None = None,
        maximum: int = INT32_MAX,
    ) -> int | None:
        if self.get(obj, key) is MISSING:
            return None
        before = len(self.errors)
        value = self.integer(obj, key, path, default=0, minimum=minimum, maximum=maximum)
        return value if len(self.errors) == before else None

    def boolean(self, obj: Mapping[str, Any] | None, key: str, path: str, *, default: bool) -> bool:
        value = self.get(obj, key)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {_describe(value)}")
            return default
        return value

    def optional_boolean(self, obj: Mapping[str, Any] | None, key: str, path: str) -> bool | None:
        """A boolean whose absence means something of its own (None), not false."""
        if self.get(obj, key) is MISSING:
            return None
        before = len(self.errors)
        value = self.boolean(obj, key, path, default=False)
        return value if len(self.errors) == before else None

    def string(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        required: bool = False,
        allow_newlines: bool = True,
    ) -> str | None:
        """A string, or None when absent; empty strings are returned as ""."""
        value = self.get(obj, key)
        if value is MISSING:
            if required:
                self.error(path, "required")
            return None
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {_describe(value)}")
            return None
        if not self.argv_safe(value, path, allow_newlines=allow_newlines):
            return None
        return value

    def argv_safe(self, value: str, path: str, *, allow_newlines: bool) -> bool:
        """NUL cannot be passed to exec at all; newlines smuggle lines into logs."""
        if "\x00" in value:
            self.error(path, "must not contain a NUL character")
            return False
        if not allow_newlines and ("\n" in value or "\r" in value):
            self.error(path, "must not contain a line break")
            return False
        return True

    def enum(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        enum: type[E],
        *,
        default: E | None,
        empty_is_unset: bool = True,
    ) -> E | None:
        value = self.get(obj, key)
        if value is MISSING or (empty_is_unset and value == ""):
            return default
        allowed = ", ".join(member.value for member in enum)
        if not isinstance(value, str):
            self.error(path, f"expected one of {allowed}; got {_describe(value)}")
            return default
        try:
            return enum(value)
        except ValueError:
            self.error(path, f"unsupported value {value!r}; expected one of {allowed}")
            return default

    def string_list(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        item_check: Callable[[str, str], None] | None = None,
    ) -> tuple[str, ...]:
        value = self.get(obj, key)
        if value is MISSING:
            return ()
        if not isinstance(value, list | tuple):
            self.error(path, f"expected a list of strings, got {_describe(value)}")
            return ()
        items: list[str] = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if not isinstance(item, str):
                self.error(item_path, f"expected a string, got {_describe(item)}")
                continue
            if not self.argv_safe(item, item_path, allow_newlines=False):
                continue
            if item_check is not None:
                item_check(item, item_path)
            items.append(item)
        return tuple(items)


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


def _display_name(raw: Any) -> str:
    """Best-effort "namespace/name" for error prefixes, even for broken objects."""
    meta = raw.get("metadata") if isinstance(raw, Mapping) else None
    if not isinstance(meta, Mapping):
        return ""
    name = meta.get("name")
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(name, str) or not isinstance(namespace, str):
        return ""
    return f"{namespace}/{name}"


def _read_meta(r: _Reader, raw: Mapping[str, Any]) -> ObjectMeta:
    meta = r.mapping(raw, "metadata", "metadata", required=True)
    name = r.string(meta, "name", "metadata.name", required=meta is not None) or ""
    if name:
        _check_subdomain(r, name, "metadata.name")
    elif meta is not None and "name" in meta and isinstance(meta["name"], str):
        r.error("metadata.name", "must not be empty")
    namespace = r.string(meta, "namespace", "metadata.namespace")
    if namespace:
        _check_label(r, namespace, "metadata.namespace")
    uid = r.string(meta, "uid", "metadata.uid") or None
    generation = r.optional_integer(meta, "generation", "metadata.generation", minimum=0, maximum=2**63 - 1)
    resource_version = r.string(meta, "resourceVersion", "metadata.resourceVersion") or None
    return ObjectMeta(
        namespace=namespace or DEFAULT_NAMESPACE,
        name=name,
        uid=uid,
        generation=generation,
        resource_version=resource_version,
    )


def _check_subdomain(r: _Reader, value: str, path: str) -> None:
    """DNS-1123 subdomain: what Kubernetes requires of most object names."""
    if len(value) > 253:
        r.error(path, f"must be at most 253 characters, got {len(value)}")
    elif not is_dns1123_subdomain(value):
        r.error(
            path,
            f"{value!r} is not a valid name: use lower-case letters, digits, '-' and '.',"
            " starting and ending with a letter or digit",
        )


def _check_label(r: _Reader, value: str, path: str) -> None:
    """DNS-1123 label: what Kubernetes requires of namespace names."""
    if len(value) > 63:
        r.error(path, f"must be at most 63 characters, got {len(value)}")
    elif not is_dns1123_label(value):
        r.error(
            path,
            f"{value!r} is not a valid namespace: use lower-case letters, digits and '-',"
            " starting and ending with a letter or digit",
        )


def _top_level(r: _Reader, raw: Any) -> Mapping[str, Any] | None:
    if not isinstance(raw, Mapping):
        r.error("<root>", f"expected an object, got {_describe(raw)}")
        return None
    return raw


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def parse_model(raw: Any) -> Parsed[Model] | Invalid:
    """Validate one `Model` as returned by the API server (or read from YAML)."""
    r = _Reader(MODEL_KIND, _display_name(raw))
    obj = _top_level(r, raw)
    if obj is None:
        return Invalid(tuple(r.errors))
    meta = _read_meta(r, obj)
    spec = r.mapping(obj, "spec", "spec", required=True)

    # An MLX model is a directory, so its source may name one (format is checked below).
    source = _read_source(r, spec, directory=isinstance(spec, Mapping) and spec.get("format") == ModelFormat.MLX.value)
    sha256 = r.string(spec, "sha256", "spec.sha256") or None
    if sha256 is not None:
        if _SHA256.fullmatch(sha256):
            sha256 = sha256.lower()
        else:
            r.error("spec.sha256", "must be exactly 64 hexadecimal characters")
            sha256 = None
    fmt = r.enum(spec, "format", "spec.format", ModelFormat, default=ModelFormat.GGUF)
    hardware = _read_hardware(r, spec)
    secret_ref = _read_secret_ref(r, spec)
    if spec is not None:
        r.errors.extend(fields.refusals(MODEL_KIND, spec, r.name))

    if r.errors or source is None:
        return Invalid(tuple(r.errors))
    return Parsed(
        Model(
            meta=meta,
            spec=ModelSpec(source=source, sha256=sha256, format=fmt or ModelFormat.GGUF, hardware=hardware,
                           source_secret_ref=secret_ref),
        )
    )


_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def _read_secret_ref(r: _Reader, spec: Mapping[str, Any] | None) -> SecretRef | None:
    """`spec.sourceSecretRef` (LLMKube's `LocalObjectReference`): the Secret whose `token` key holds a
    download bearer token. Both CRDs accept only `name`; a `key` is honoured only where no CRD
    checks the object (`metal-agent render` of a local file)."""
    ref = r.mapping(spec, "sourceSecretRef", "spec.sourceSecretRef")
    if ref is None:
        return None
    name = r.string(ref, "name", "spec.sourceSecretRef.name", required=True)
    if name:
        _check_subdomain(r, name, "spec.sourceSecretRef.name")
    key = r.string(ref, "key", "spec.sourceSecretRef.key") or "token"
    if not _SECRET_KEY.fullmatch(key):
        r.error("spec.sourceSecretRef.key", "must be a Secret data key: letters, digits, '-', '_' or '.'")
    return SecretRef(name, key) if name else None


def _read_source(r: _Reader, spec: Mapping[str, Any] | None, *, directory: bool = False) -> ModelSource | None:
    path = "spec.source"
    raw = r.string(spec, "source", path, required=spec is not None, allow_newlines=False)
    if raw is None:
        return None
    if not raw.strip():
        r.error(path, "must not be empty")
        return None
    if raw != raw.strip():
        r.error(path, "must not start or end with whitespace")
        return None
    if any(not ch.isprintable() for ch in raw):
        r.error(path, "must not contain control characters")
        return None

    match = _URL_SCHEME.fullmatch(raw)
    if match:
        scheme, rest = match.group(1).lower(), match.group(2)
        kind = _SOURCE_SCHEMES.get(scheme)
        if kind is None:
            r.error(path, f"unsupported scheme {scheme!r}; use http(s)://, file://, hf://, pvc://, s3://,"
                    " an absolute path or a catalogue name")
            return None
        location = rest.split("?", 1)[0].split("#", 1)[0]
        if kind is SourceKind.FILE and not location.startswith("/"):
            r.error(path, "file:// sources need an absolute path, as in file:///Users/me/model.gguf")
            return None
        if kind is not SourceKind.FILE and not location.split("/", 1)[0]:
            r.error(path, f"{scheme}:// source has no host, bucket or repository")
            return None
    elif raw.startswith("/"):
        kind, location = SourceKind.PATH, raw
    else:
        kind, location = SourceKind.NAME, raw

    if ".." in location.split("/") or ".." in unquote(location).split("/"):
        # The file name becomes part of a cache path; never let it climb out,
        # not even percent-encoded for a downloader that decodes it.
        r.error(path, "must not contain '..' path segments")
        return None
    names_no_file = location.endswith("/") or (kind is SourceKind.HTTP and "/" not in location)
    if kind in (SourceKind.HTTP, SourceKind.FILE, SourceKind.PATH) and names_no_file and not directory:
        r.error(path, "must name a file, not a directory")
        return None
    return ModelSource(raw=raw, kind=kind)


def _read_hardware(r: _Reader, spec: Mapping[str, Any] | None) -> HardwareSpec:
    hw = r.mapping(spec, "hardware", "spec.hardware")
    accelerator = r.enum(
        hw, "accelerator", "spec.hardware.accelerator", Accelerator, default=Accelerator.CPU
    )
    gpu = _read_gpu(r, hw)

    budget_bytes: int | None = None
    budget = r.get(hw, "memoryBudget")
    budget_path = "spec.hardware.memoryBudget"
    if budget is not MISSING:
        if isinstance(budget, str):
            budget_bytes = quantity_to_bytes(budget)
            if budget_bytes is None:
                r.error(budget_path, f"{budget!r} is not a Kubernetes quantity such as 48Gi or 512M")
        elif isinstance(budget, int) and not isinstance(budget, bool):
            budget_bytes = budget
        else:
            r.error(budget_path, f"expected a quantity string such as 48Gi, got {_describe(budget)}")
        if budget_bytes is not None and budget_bytes <= 0:
            r.error(budget_path, "must be greater than zero")
            budget_bytes = None

    fraction: float | None = None
    raw_fraction = r.get(hw, "memoryFraction")
    fraction_path = "spec.hardware.memoryFraction"
    if raw_fraction is not MISSING:
        if isinstance(raw_fraction, bool) or not isinstance(raw_fraction, int | float):
            r.error(fraction_path, f"expected a number, got {_describe(raw_fraction)}")
        elif not math.isfinite(raw_fraction) or not 0 < raw_fraction <= 1:
            r.error(fraction_path, f"must be greater than 0 and at most 1, got {raw_fraction}")
        else:
            fraction = float(raw_fraction)

    return HardwareSpec(
        accelerator=accelerator or Accelerator.CPU,
        gpu=gpu,
        memory_budget_bytes=budget_bytes,
        memory_fraction=fraction,
    )


def _read_gpu(r: _Reader, hw: Mapping[str, Any] | None) -> GpuSpec:
    gpu = r.mapping(hw, "gpu", "spec.hardware.gpu")
    if gpu is None:
        return GpuSpec()
    layers = r.integer(gpu, "layers", "spec.hardware.gpu.layers", default=0, minimum=-1)
    count = r.optional_integer(gpu, "count", "spec.hardware.gpu.count", minimum=0, maximum=8)

    sharding_raw = r.mapping(gpu, "sharding", "spec.hardware.gpu.sharding")
    sharding: ShardingSpec | None = None
    if sharding_raw is not None:
        base = "spec.hardware.gpu.sharding"
        strategy = r.enum(sharding_raw, "strategy", f"{base}.strategy", ShardingStrategy, default=None)
        split = _read_layer_split(r, sharding_raw, f"{base}.layerSplit", count)
        sharding = ShardingSpec(strategy=strategy, layer_split=split)
    return GpuSpec(layers=layers, count=count, sharding=sharding)


def _read_layer_split(
    r: _Reader, sharding: Mapping[str, Any], path: str, count: int | None
) -> tuple[Decimal, ...]:
    before = len(r.errors)
    proportions: list[Decimal] = []

    def check(item: str, item_path: str) -> None:
        text = item.strip()
        if text.startswith("-") and _DECIMAL.fullmatch(text[1:]):
            r.error(item_path, f"must not be negative, got {item!r}")
        elif not _DECIMAL.fullmatch(text):
            r.error(item_path, f"{item!r} is not a non-negative decimal number such as 1 or 0.5")
        else:
            proportions.append(Decimal(text))

    r.string_list(sharding, "layerSplit", path, item_check=check)
    raw = r.get(sharding, "layerSplit")
    entries = len(raw) if isinstance(raw, list | tuple) else 0
    if entries and count is not None and entries != count:
        r.error(path, f"has {entries} entries but spec.hardware.gpu.count is {count}")
    if len(r.errors) != before:
        return ()
    if entries and not any(proportions):
        r.error(path, "must give at least one device a non-zero share")
    return tuple(p.normalize() if p else Decimal(0) for p in proportions)


# ---------------------------------------------------------------------------
# InferenceService
# ---------------------------------------------------------------------------


def parse_inference_service(raw: Any) -> Parsed[InferenceService] | Invalid:
    """Validate one `InferenceService` as returned by the API server (or read from YAML)."""
    r = _Reader(ISVC_KIND, _display_name(raw))
    obj = _top_level(r, raw)
    if obj is None:
        return Invalid(tuple(r.errors))
    meta = _read_meta(r, obj)
    s = r.mapping(obj, "spec", "spec", required=True)

    model_ref = r.string(s, "modelRef", "spec.modelRef", required=s is not None) or ""
    if model_ref:
        _check_subdomain(r, model_ref, "spec.modelRef")
    elif s is not None and isinstance(s.get("modelRef"), str):
        r.error("spec.modelRef", "must not be empty")

    spec = InferenceServiceSpec(
        model_ref=model_ref,
        replicas=r.integer(s, "replicas", "spec.replicas", default=1, minimum=0, maximum=10),
        suspend=r.boolean(s, "suspend", "spec.suspend", default=False),
        runtime=r.enum(s, "runtime", "spec.runtime", Runtime, default=Runtime.LLAMACPP)
        or Runtime.LLAMACPP,
        context_size=r.integer(
            s, "contextSize", "spec.contextSize", default=2048, minimum=128, maximum=2_097_152
        ),
        rope_scaling=_read_rope_scaling(r, s),
        parallel_slots=r.integer(
            s, "parallelSlots", "spec.parallelSlots", default=1, minimum=1, maximum=64
        ),
        flash_attention=r.boolean(s, "flashAttention", "spec.flashAttention", default=True),
        jinja=r.optional_boolean(s, "jinja", "spec.jinja"),
        cache_type_k=r.enum(s, "cacheTypeK", "spec.cacheTypeK", CacheType, default=None),
        cache_type_v=r.enum(s, "cacheTypeV", "spec.cacheTypeV", CacheType, default=None),
        cache_type_custom_k=_read_custom_cache_type(r, s, "cacheTypeCustomK"),
        cache_type_custom_v=_read_custom_cache_type(r, s, "cacheTypeCustomV"),
        moe_cpu_offload=r.boolean(s, "moeCPUOffload", "spec.moeCPUOffload", default=False),
        moe_cpu_layers=r.integer(s, "moeCPULayers", "spec.moeCPULayers", default=0, minimum=0),
        no_kv_offload=r.boolean(s, "noKvOffload", "spec.noKvOffload", default=False),
        no_warmup=r.boolean(s, "noWarmup", "spec.noWarmup", default=False),
        reasoning_budget=r.integer(
            s, "reasoningBudget", "spec.reasoningBudget", default=0, minimum=0
        ),
        reasoning_budget_message=r.string(
            s, "reasoningBudgetMessage", "spec.reasoningBudgetMessage"
        )
        or None,
        metadata_overrides=r.string_list(
            s, "metadataOverrides", "spec.metadataOverrides", item_check=_kv_override_check(r)
        ),
        tensor_overrides=r.string_list(
            s, "tensorOverrides", "spec.tensorOverrides", item_check=_tensor_override_check(r)
        ),
        batch_size=r.integer(
            s, "batchSize", "spec.batchSize", default=2048, minimum=1, maximum=16384
        ),
        ubatch_size=r.optional_integer(s, "uBatchSize", "spec.uBatchSize", minimum=1),
        extra_args=r.string_list(s, "extraArgs", "spec.extraArgs", item_check=_extra_arg_check(r)),
        mode=r.enum(s, "mode", "spec.mode", Mode, default=Mode.CHAT) or Mode.CHAT,
        priority=r.enum(s, "priority", "spec.priority", Priority, default=Priority.NORMAL)
        or Priority.NORMAL,
        eviction_protection=r.boolean(
            s, "evictionProtection", "spec.evictionProtection", default=False
        ),
        **_read_speculative(r, s),
    )
    _check_flash_attention(r, spec)
    if s is not None:
        r.errors.extend(fields.refusals(ISVC_KIND, s, r.name))
    if r.errors:
        return Invalid(tuple(r.errors))
    return Parsed(InferenceService(meta=meta, spec=spec))


def _read_speculative(r: _Reader, s: Mapping[str, Any] | None) -> dict[str, Any]:
    """`speculativeDecoding`, leniently: LLMKube's CRD validates the block, so values of the wrong
    type are dropped here and each engine honours or refuses the rest (`Engine.refusals`)."""
    block = r.get(s, "speculativeDecoding")
    block = block if isinstance(block, Mapping) else {}

    def text(key: str) -> str | None:
        value = block.get(key)
        return value if isinstance(value, str) and value else None

    tokens = block.get("nDraftMax")
    p_min = block.get("pMin")
    return {
        "draft_p_min": float(p_min) if isinstance(p_min, int | float) and not isinstance(p_min, bool) else None,
        "speculative_type": text("type"),
        "draft_model_ref": text("draftModelRef"),
        "draft_model_file": text("draftModel"),
        "draft_tokens": tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1 else None,
    }


def _check_flash_attention(r: _Reader, spec: InferenceServiceSpec) -> None:
    """Refuse `flashAttention: false` with a quantized V cache, which llama-server cannot run.

    Without Flash Attention llama.cpp keeps the V cache transposed, which a
    block-quantized type cannot be, so it refuses the context at load time
    ("quantized V cache requires flash_attn to be enabled", checked against
    the real binary in tests/integration/test_argv_llama_server.py) and
    exits: the service would crash-loop on every start. Saying so here puts
    the reason on the spec, before anything starts. A quantized K cache alone
    is fine. Flags in extraArgs are not interpreted (they are passed as
    written, and a conflict there shows as llama-server's own stderr line).
    """
    if spec.flash_attention or not spec.quantized_cache_v:
        return
    key = "cacheTypeCustomV" if spec.cache_type_custom_v else "cacheTypeV"
    r.error(
        "spec.flashAttention",
        f"false cannot be combined with the quantized V cache spec.{key}: {spec.effective_cache_type_v}"
        ' (llama-server exits with "quantized V cache requires flash_attn to be enabled");'
        " leave flashAttention unset or true, or use an f16, bf16 or f32 V cache",
    )


def _read_rope_scaling(r: _Reader, s: Mapping[str, Any] | None) -> RopeScaling | None:
    base = "spec.ropeScaling"
    rope = r.mapping(s, "ropeScaling", base)
    if rope is None:
        return None
    kind = r.enum(rope, "type", f"{base}.type", RopeScalingType, default=None)

    factor: str | None = None
    raw_factor = r.get(rope, "factor")
    if raw_factor is not MISSING and raw_factor != "":
        if not isinstance(raw_factor, str):
            r.error(
                f"{base}.factor",
                f"expected a decimal string such as \"4.0\" (quote it), got {_describe(raw_factor)}",
            )
        elif not _DECIMAL.fullmatch(raw_factor):
            r.error(f"{base}.factor", f"{raw_factor!r} is not a decimal number such as 4 or 2.5")
        elif Decimal(raw_factor) <= 0:
            r.error(f"{base}.factor", f"must be greater than 0, got {raw_factor!r}")
        else:
            factor = format(Decimal(raw_factor).normalize(), "f")

    original = r.optional_integer(rope, "originalContext", f"{base}.originalContext", minimum=128)
    if kind is None and factor is None and original is None:
        return None
    return RopeScaling(type=kind, factor=factor, original_context=original)


def _read_custom_cache_type(r: _Reader, s: Mapping[str, Any] | None, key: str) -> str | None:
    path = f"spec.{key}"
    value = r.string(s, key, path, allow_newlines=False)
    if not value:
        return None
    if not CACHE_TYPE_TOKEN.fullmatch(value):
        r.error(
            path,
            f"{value!r} is not a cache type name: use 1-32 lower-case letters, digits"
            " or '_' (for example turbo3)",
        )
        return None
    return value


def _extra_arg_check(r: _Reader) -> Callable[[str, str], None]:
    """Only what every engine needs; which options and values may pass is the engine's
    allowlist, checked in `claim.evaluate` once the engine is known (`core.extra_args`)."""
    def check(item: str, path: str) -> None:
        if not item:
            r.error(path, "must not be empty")

    return check


def _kv_override_check(r: _Reader) -> Callable[[str, str], None]:
    def check(item: str, path: str) -> None:
        if not _KV_OVERRIDE.fullmatch(item):
            r.error(path, f"{item!r} is not a metadata override of the form key=type:value"
                    " (type one of int, float, bool, str)")

    return check


def _tensor_override_check(r: _Reader) -> Callable[[str, str], None]:
    def check(item: str, path: str) -> None:
        pattern, sep, target = item.partition("=")
        if not sep or not pattern.strip() or not target.strip():
            r.error(path, f"{item!r} is not a tensor override of the form <tensor pattern>=<buffer type>")

    return check


# ---------------------------------------------------------------------------
# Cross-object checks
# ---------------------------------------------------------------------------


def check_servable(model: Model) -> tuple[FieldError, ...]:
    """A format no engine of this agent serves (the engine's own refusals come after)."""
    if model.spec.format in UNSERVABLE_FORMATS:
        return (
            FieldError(
                "spec.format",
                f"metal-agent serves GGUF files (llama-server) and MLX directories (mlx_lm.server);"
                f" format {model.spec.format.value!r} needs another runtime",
                MODEL_KIND,
                model.meta.key,
            ),
        )
    return ()
