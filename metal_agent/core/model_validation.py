"""Turn a raw `Model` into a typed spec, or list what is wrong with it.

The rules are LLMKube's CRD rules (so anything LLMKube's API server would
refuse is refused here too, which matters for manifests rendered offline and
for clusters whose CRDs lag behind) plus the agent's own safety rules: no
`..` in model sources that become cache paths, Secret keys that are data keys.
Fields LLMKube's CRD has and the agent does not honour are refused when set
(`core.fields`, reason `UnsupportedField`); fields no CRD of LLMKube's has are
ignored. How a field is read (errors collected, nulls and booleans refused) is
`core.spec_reader`'s job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from metal_agent.core import fields
from metal_agent.core.api import (
    Accelerator,
    GpuSpec,
    HardwareSpec,
    Model,
    ModelFormat,
    ModelSource,
    ModelSpec,
    SecretRef,
    ShardingSpec,
    ShardingStrategy,
    SourceKind,
)
from metal_agent.core.companion_files import read_files
from metal_agent.core.object_meta import check_subdomain, display_name, read_meta, top_level
from metal_agent.core.quantity import quantity_to_bytes
from metal_agent.core.result import FieldError, Invalid, Parsed
from metal_agent.core.spec_reader import DECIMAL, MISSING, Reader, describe

MODEL_KIND = "Model"

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_URL_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)", re.DOTALL)

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


def parse_model(raw: Any) -> Parsed[Model] | Invalid:
    """Validate one `Model` as returned by the API server (or read from YAML)."""
    r = Reader(MODEL_KIND, display_name(raw))
    obj = top_level(r, raw)
    if obj is None:
        return Invalid(tuple(r.errors))
    meta = read_meta(r, obj)
    spec = r.mapping(obj, "spec", "spec", required=True)

    # An MLX model is a directory, so its source may name one (format is checked below).
    # With spec.files the source names the repository or directory they come from.
    source = _read_source(r, spec, directory=isinstance(spec, Mapping) and (
        spec.get("format") == ModelFormat.MLX.value or bool(spec.get("files"))))
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
    files, mmproj = read_files(r, spec, fmt)
    if spec is not None:
        r.errors.extend(fields.refusals(MODEL_KIND, spec, r.name))

    if r.errors or source is None:
        return Invalid(tuple(r.errors))
    return Parsed(
        Model(
            meta=meta,
            spec=ModelSpec(source=source, sha256=sha256, format=fmt or ModelFormat.GGUF, hardware=hardware,
                           source_secret_ref=secret_ref, files=files, mmproj=mmproj),
        )
    )


_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def _read_secret_ref(r: Reader, spec: Mapping[str, Any] | None) -> SecretRef | None:
    """`spec.sourceSecretRef` (LLMKube's `LocalObjectReference`): the Secret whose `token` key holds a
    download bearer token. Both CRDs accept only `name`; a `key` is honoured only where no CRD
    checks the object (`metal-agent render` of a local file)."""
    ref = r.mapping(spec, "sourceSecretRef", "spec.sourceSecretRef")
    if ref is None:
        return None
    name = r.string(ref, "name", "spec.sourceSecretRef.name", required=True)
    if name:
        check_subdomain(r, name, "spec.sourceSecretRef.name")
    key = r.string(ref, "key", "spec.sourceSecretRef.key") or "token"
    if not _SECRET_KEY.fullmatch(key):
        r.error("spec.sourceSecretRef.key", "must be a Secret data key: letters, digits, '-', '_' or '.'")
    return SecretRef(name, key) if name else None


def _read_source(r: Reader, spec: Mapping[str, Any] | None, *, directory: bool = False) -> ModelSource | None:
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


def _read_hardware(r: Reader, spec: Mapping[str, Any] | None) -> HardwareSpec:
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
            r.error(budget_path, f"expected a quantity string such as 48Gi, got {describe(budget)}")
        if budget_bytes is not None and budget_bytes <= 0:
            r.error(budget_path, "must be greater than zero")
            budget_bytes = None

    fraction: float | None = None
    raw_fraction = r.get(hw, "memoryFraction")
    fraction_path = "spec.hardware.memoryFraction"
    if raw_fraction is not MISSING:
        if isinstance(raw_fraction, bool) or not isinstance(raw_fraction, int | float):
            r.error(fraction_path, f"expected a number, got {describe(raw_fraction)}")
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


def _read_gpu(r: Reader, hw: Mapping[str, Any] | None) -> GpuSpec:
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
    r: Reader, sharding: Mapping[str, Any], path: str, count: int | None
) -> tuple[Decimal, ...]:
    before = len(r.errors)
    proportions: list[Decimal] = []

    def check(item: str, item_path: str) -> None:
        text = item.strip()
        if text.startswith("-") and DECIMAL.fullmatch(text[1:]):
            r.error(item_path, f"must not be negative, got {item!r}")
        elif not DECIMAL.fullmatch(text):
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
