"""A digest of exactly what the running llama-server process depends on.

The agent stores it with each process (and on the process it adopts after a
restart); a different digest means "respawn to apply the new spec", an
equal one means "leave it running". So it must change for every field that
changes the command line or the weights, and for nothing else:

* In: every argv-affecting InferenceService field, and the Model's source,
  sha256, gpu layers and sharding.
* Out: replicas (only zero versus non-zero matters, and that decides
  whether a process exists at all, not which), suspend, priority,
  evictionProtection, labels, annotations, and the agent-level options
  (port, model path, threads), which are not part of the spec.

It hashes the *normalised* typed values, so key order, defaults written out
versus left implicit, "4" versus "4.0" and similar spellings do not matter.
The payload carries a schema version: bump it when the meaning of a field
changes. Unset values (None, empty lists) are left out of the payload, so a
field added later with an unset default keeps every existing digest, and
upgrading the agent does not restart every model. When a field's rendering
changes for some values only (`jinja: false` now emits `--no-jinja`), those
values get a new key instead of a schema bump, so only the specs whose
process really changes are respawned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from metal_agent.core.api import InferenceServiceSpec, ModelSpec
from metal_agent.core.argv import spec_type
from metal_agent.core.workload import Workload

SCHEMA_VERSION = 1
#: Bumped when the llama-server command line rendered from the same spec changes for every spec
#: (2: `--parallel 1` and `--cache-ram` always sent).
LLAMA_ARGV_REVISION = 2
SHORT_LENGTH = 12


@dataclass(frozen=True, slots=True)
class SpecHash:
    """sha256 hex digest; `short` is for labels, logs and process names."""

    value: str

    @property
    def short(self) -> str:
        return self.value[:SHORT_LENGTH]

    def __str__(self) -> str:
        return self.value


def spec_hash(workload: Workload) -> SpecHash:
    payload = json.dumps(
        _payload(workload.model.spec, workload.isvc.spec, workload.draft.spec if workload.draft else None),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return SpecHash(hashlib.sha256(payload.encode("ascii")).hexdigest())


def _payload(model: ModelSpec, spec: InferenceServiceSpec, draft: ModelSpec | None = None) -> dict[str, Any]:
    gpu = model.hardware.gpu
    sharding = gpu.sharding
    rope = spec.rope_scaling
    fields: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        # Model: what is loaded and where its layers go.
        "model.source": model.source.raw,
        # Only formats other than GGUF add a key, so every existing digest stays; the format
        # decides the engine, a different process.
        "model.format": model.format.value if model.format.value != "gguf" else None,
        "model.sha256": model.sha256,
        "model.gpuLayers": gpu.layers,
        "model.splitMode": sharding.strategy.value if sharding and sharding.strategy else None,
        "model.layerSplit": [format(p, "f") for p in sharding.layer_split] if sharding else [],
        # Set only with files (so no other digest moves): which files make the model.
        "model.files": list(model.files),
        "model.mmproj": model.mmproj,
        # InferenceService: every field that reaches the command line.
        "contextSize": spec.context_size,
        "rope.type": rope.type.value if rope and rope.type else None,
        "rope.factor": rope.factor if rope else None,
        "rope.originalContext": rope.original_context if rope else None,
        "parallelSlots": spec.parallel_slots,
        "flashAttention": spec.flash_attention,
        # `jinja` kept its old key and values (unset and false were both
        # false, true was true) so existing digests do not move; an explicit
        # false now renders `--no-jinja`, a different process, so it adds a
        # key of its own.
        "jinja": spec.jinja is True,
        "noJinja": True if spec.jinja is False else None,
        # Resolved, so cacheTypeK q8_0 and cacheTypeCustomK q8_0 hash alike:
        # they produce the same process.
        "cacheTypeK": spec.effective_cache_type_k,
        "cacheTypeV": spec.effective_cache_type_v,
        "moeCPUOffload": spec.moe_cpu_offload,
        "moeCPULayers": spec.moe_cpu_layers,
        "noKvOffload": spec.no_kv_offload,
        "noWarmup": spec.no_warmup,
        # Unset hashes as 0 did (so existing digests stay); an explicit 0 now renders
        # `--reasoning-budget 0`, a different process, so it adds a key of its own.
        "reasoningBudget": spec.reasoning_budget or 0,
        "reasoningBudgetZero": True if spec.reasoning_budget == 0 else None,
        "reasoningBudgetMessage": spec.reasoning_budget_message,
        "metadataOverrides": list(spec.metadata_overrides),
        "tensorOverrides": list(spec.tensor_overrides),
        "batchSize": spec.batch_size,
        "uBatchSize": spec.ubatch_size,
        "mode": spec.mode.value,
        "extraArgs": list(spec.extra_args),
        # llama-server's command line now always says --parallel (1 included) and --cache-ram,
        # so every llama-server process started before is respawned once to get them; MLX
        # digests do not move (its command line did not change).
        "llamaArgv": LLAMA_ARGV_REVISION if model.format.value != "mlx" else None,
    }
    if model.format.value != "mlx" and spec_type(spec) is not None:
        # llama-server's speculative decoding (mlx_lm.server's is hashed through its draft below):
        # unset before, so no existing digest moves.
        fields["speculative.type"] = spec_type(spec)  # resolved: `draft` and `draft-simple` are one process
        fields["speculative.nDraftMax"] = spec.draft_tokens
        fields["speculative.pMin"] = spec.draft_p_min
    if draft is not None:  # only engines that run a draft Model carry one: other digests never move
        fields["draft.source"] = draft.source.raw
        fields["draft.tokens"] = spec.draft_tokens
    return {key: value for key, value in fields.items() if value is not None and value != []}
