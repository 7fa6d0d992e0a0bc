"""Turn a raw `InferenceService` into a typed spec, or list what is wrong with it.

The rules are LLMKube's CRD rules plus the agent's own: overrides in the
form llama-server reads, no empty extraArgs (which options may pass is the
engine's allowlist, `core.extra_args`), and the cache-type rules of
`core.cache_rules`. Fields LLMKube's CRD has and the agent does not honour
are refused when set (`core.fields`, reason `UnsupportedField`); fields no
CRD of LLMKube's has are ignored. How a field is read is `core.spec_reader`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from metal_agent.core import fields
from metal_agent.core.api import (
    CacheType,
    InferenceService,
    InferenceServiceSpec,
    Mode,
    Priority,
    RopeScaling,
    RopeScalingType,
    Runtime,
)
from metal_agent.core.cache_rules import check_flash_attention, read_custom_cache_type
from metal_agent.core.lifecycle import Lifetime, RolloutPolicy
from metal_agent.core.llama_overrides import kv_override_problem, tensor_override_problem
from metal_agent.core.object_meta import check_subdomain, display_name, read_meta, top_level
from metal_agent.core.result import Invalid, Parsed
from metal_agent.core.spec_reader import DECIMAL, MISSING, Reader, describe

ISVC_KIND = "InferenceService"



def parse_inference_service(raw: Any) -> Parsed[InferenceService] | Invalid:
    """Validate one `InferenceService` as returned by the API server (or read from YAML)."""
    r = Reader(ISVC_KIND, display_name(raw))
    obj = top_level(r, raw)
    if obj is None:
        return Invalid(tuple(r.errors))
    meta = read_meta(r, obj)
    s = r.mapping(obj, "spec", "spec", required=True)

    model_ref = r.string(s, "modelRef", "spec.modelRef", required=s is not None) or ""
    if model_ref:
        check_subdomain(r, model_ref, "spec.modelRef")
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
        cache_type_custom_k=read_custom_cache_type(r, s, "cacheTypeCustomK"),
        cache_type_custom_v=read_custom_cache_type(r, s, "cacheTypeCustomV"),
        moe_cpu_offload=r.boolean(s, "moeCPUOffload", "spec.moeCPUOffload", default=False),
        moe_cpu_layers=r.integer(s, "moeCPULayers", "spec.moeCPULayers", default=0, minimum=0),
        no_kv_offload=r.boolean(s, "noKvOffload", "spec.noKvOffload", default=False),
        no_warmup=r.boolean(s, "noWarmup", "spec.noWarmup", default=False),
        reasoning_budget=r.optional_integer(s, "reasoningBudget", "spec.reasoningBudget", minimum=0),
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
        rollout_policy=_read_rollout(r, s),
        lifetime=Lifetime(
            max_s=r.optional_integer(s, "maxPodLifetimeSeconds", "spec.maxPodLifetimeSeconds", minimum=1),
            idle_timeout_s=r.optional_integer(s, "maxPodLifetimeIdleTimeoutSeconds",
                                              "spec.maxPodLifetimeIdleTimeoutSeconds", minimum=0)),
    )
    check_flash_attention(r, spec)
    if s is not None:
        r.errors.extend(fields.refusals(ISVC_KIND, s, r.name))
    if r.errors:
        return Invalid(tuple(r.errors))
    return Parsed(InferenceService(meta=meta, spec=spec))


def _read_speculative(r: Reader, s: Mapping[str, Any] | None) -> dict[str, Any]:
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


def _read_rollout(r: Reader, s: Mapping[str, Any] | None) -> RolloutPolicy | None:
    block = r.mapping(s, "rolloutPolicy", "spec.rolloutPolicy")
    if block is None:
        return None
    return RolloutPolicy(
        wait_for_idle=r.boolean(block, "waitForIdle", "spec.rolloutPolicy.waitForIdle", default=False),
        idle_timeout_s=r.integer(block, "idleTimeoutSeconds", "spec.rolloutPolicy.idleTimeoutSeconds", default=0,
                                 minimum=0, maximum=7 * 24 * 3600),
        force=r.boolean(block, "force", "spec.rolloutPolicy.force", default=False))


def _read_rope_scaling(r: Reader, s: Mapping[str, Any] | None) -> RopeScaling | None:
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
                f"expected a decimal string such as \"4.0\" (quote it), got {describe(raw_factor)}",
            )
        elif not DECIMAL.fullmatch(raw_factor):
            r.error(f"{base}.factor", f"{raw_factor!r} is not a decimal number such as 4 or 2.5")
        elif Decimal(raw_factor) <= 0:
            r.error(f"{base}.factor", f"must be greater than 0, got {raw_factor!r}")
        else:
            factor = format(Decimal(raw_factor).normalize(), "f")

    original = r.optional_integer(rope, "originalContext", f"{base}.originalContext", minimum=128)
    if kind is None and factor is None and original is None:
        return None
    return RopeScaling(type=kind, factor=factor, original_context=original)


def _extra_arg_check(r: Reader) -> Callable[[str, str], None]:
    """Only what every engine needs; which options and values may pass is the engine's
    allowlist, checked in `claim.evaluate` once the engine is known (`core.extra_args`)."""
    def check(item: str, path: str) -> None:
        if not item:
            r.error(path, "must not be empty")

    return check


def _kv_override_check(r: Reader) -> Callable[[str, str], None]:
    """As llama-server reads an `--override-kv` item (`core.llama_overrides`)."""
    def check(item: str, path: str) -> None:
        if problem := kv_override_problem(item):
            r.error(path, f"{item!r} {problem}" if problem.startswith("is not") else f"{item!r}: {problem}")

    return check


def _tensor_override_check(r: Reader) -> Callable[[str, str], None]:
    """As llama-server reads an `--override-tensor` item: a comma or a second '=' cannot be said."""
    def check(item: str, path: str) -> None:
        if problem := tensor_override_problem(item):
            r.error(path, f"{item!r} {problem}")

    return check
