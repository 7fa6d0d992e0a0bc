"""The KV-cache type rules of an InferenceService: custom type names, and the V cache Flash Attention needs.

Separate because these are llama-server's rules (what its `--cache-type-k/v`
accept and when it exits at load time), not LLMKube's CRD rules, and they are
checked against the real binary in tests/integration/test_argv_llama_server.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metal_agent.core.api import InferenceServiceSpec
from metal_agent.core.flags import CACHE_TYPE_TOKEN
from metal_agent.core.spec_reader import Reader


def read_custom_cache_type(r: Reader, s: Mapping[str, Any] | None, key: str) -> str | None:
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



def check_flash_attention(r: Reader, spec: InferenceServiceSpec) -> None:
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
