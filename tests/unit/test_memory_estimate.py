"""Memory estimates: KV cache arithmetic, header extraction, and how we differ from LLMKube."""

from __future__ import annotations

from fractions import Fraction

import pytest

from metal_agent.core.api import CacheType, InferenceServiceSpec, Mode
from metal_agent.core.gguf_header import ArrayInfo, GGUFError, GGUFHeader, ValueType
from metal_agent.core.memory import (
    CACHE_TYPE_BYTES,
    GiB,
    MiB,
    EstimateFailed,
    MemoryEstimate,
    ModelShape,
    estimate_from_header,
    estimate_memory,
    kv_cache_bytes,
    llmkube_estimate,
    model_shape,
    overhead_bytes,
)

# Llama-3-8B-like: 32 layers, 32 heads, 8 KV heads, head dim 128.
LLAMA8B = ModelShape("llama", 32, 4096, 32, (8,) * 32, 128, 128, 8192)
Q4_8B_FILE = int(4.58 * GiB)  # a Q4_K_M file of that model


def spec(**kw) -> InferenceServiceSpec:
    return InferenceServiceSpec(model_ref="m", **kw)


def header(**md) -> GGUFHeader:
    return GGUFHeader(version=3, byte_order="little", tensor_count=1, metadata=md)


@pytest.mark.parametrize("cache_type,bytes_per_value", [
    ("f32", 4), ("f16", 2), ("bf16", 2), ("q8_0", 34 / 32), ("q5_1", 24 / 32), ("q5_0", 22 / 32),
    ("q4_1", 20 / 32), ("q4_0", 18 / 32), ("iq4_nl", 18 / 32), ("turbo4", 4.25 / 8), ("turbo3", 3.25 / 8),
])
def test_kv_bytes_follow_layers_context_heads_and_type(cache_type, bytes_per_value):
    expected = 32 * 8192 * 8 * 128 * 2 * bytes_per_value  # layers × ctx × kv heads × head dim × (K + V)
    assert kv_cache_bytes(LLAMA8B, 8192, cache_type, cache_type) == pytest.approx(expected, abs=1)
    assert CACHE_TYPE_BYTES[cache_type] == Fraction(bytes_per_value)


def test_f16_cache_of_an_8b_model_at_8k_is_one_gib():
    assert kv_cache_bytes(LLAMA8B, 8192) == GiB  # unset cache types are llama.cpp's f16


def test_k_and_v_types_and_lengths_count_separately():
    mla_like = ModelShape("x", 2, 1024, 8, (8, 8), 192, 128)
    assert kv_cache_bytes(mla_like, 256, "q8_0", "f16") == 2 * 256 * 8 * (192 * Fraction(34, 32) + 128 * 2)


def test_context_is_padded_like_llama_cpp_and_slots_do_not_multiply():
    assert kv_cache_bytes(LLAMA8B, 1000) == kv_cache_bytes(LLAMA8B, 1024)
    assert kv_cache_bytes(LLAMA8B, 1025) == kv_cache_bytes(LLAMA8B, 1280)
    one, four = estimate_memory(LLAMA8B, Q4_8B_FILE, spec(context_size=8192)), \
        estimate_memory(LLAMA8B, Q4_8B_FILE, spec(context_size=8192, parallel_slots=4))
    assert one == four


def test_custom_types_win_and_unknown_ones_count_as_f16_with_a_note():
    turbo = estimate_memory(LLAMA8B, Q4_8B_FILE, spec(cache_type_k=CacheType.Q8_0, cache_type_custom_k="turbo3",
                                                      cache_type_custom_v="turbo3"))
    assert (turbo.cache_type_k, turbo.cache_type_v) == ("turbo3", "turbo3") and turbo.notes == ()
    odd = estimate_memory(LLAMA8B, Q4_8B_FILE, spec(cache_type_custom_k="turbo9", cache_type_custom_v="turbo9"))
    assert odd.kv_bytes == kv_cache_bytes(LLAMA8B, 2048, "f16", "f16")
    assert len(odd.notes) == 1 and "turbo9" in odd.notes[0] and "f16" in odd.notes[0]


def test_overhead_has_a_floor_and_grows_with_weights():
    assert overhead_bytes(100 * MiB) == 256 * MiB
    assert overhead_bytes(40 * GiB) == 2 * GiB


def test_total_and_description():
    e = estimate_memory(LLAMA8B, Q4_8B_FILE, spec(context_size=8192))
    assert isinstance(e, MemoryEstimate)
    assert e.total_bytes == Q4_8B_FILE + GiB + overhead_bytes(Q4_8B_FILE)
    assert e.describe() == "4.58 GiB weights + 1.00 GiB KV (ctx 8192, f16/f16) + 0.25 GiB overhead = 5.83 GiB"


def test_ours_grows_with_context_and_shrinks_with_quantized_kv_unlike_llmkube():
    """LLMKube's estimate (as we model it: file × 1.2) sees neither context nor cache type."""
    flat = llmkube_estimate(Q4_8B_FILE)
    default = estimate_memory(LLAMA8B, Q4_8B_FILE, spec()).total_bytes
    long = estimate_memory(LLAMA8B, Q4_8B_FILE, spec(context_size=131072)).total_bytes
    long_q4 = estimate_memory(LLAMA8B, Q4_8B_FILE, spec(context_size=131072, cache_type_k=CacheType.Q4_0,
                                                        cache_type_v=CacheType.Q4_0)).total_bytes
    assert flat == pytest.approx(1.2 * Q4_8B_FILE, abs=1)
    # At the default 2k context the two roughly agree (within 15 %) ...
    assert abs(default - flat) / flat < 0.15
    # ... a 128k f16 context needs 16 GiB of KV that the flat formula misses entirely ...
    assert long - flat > 15 * GiB
    # ... and a q4_0 cache cuts that KV to 18/64 of f16's.
    assert long_q4 < long and (long_q4 - default) < 0.3 * (long - default)


# -- from the header -------------------------------------------------------------------------


def test_shape_from_header_with_defaults():
    shape = model_shape(header(**{
        "general.architecture": "qwen2", "qwen2.block_count": 28, "qwen2.embedding_length": 3584,
        "qwen2.attention.head_count": 28, "qwen2.attention.head_count_kv": 4, "qwen2.context_length": 32768,
    }))
    assert shape == ModelShape("qwen2", 28, 3584, 28, (4,) * 28, 128, 128, 32768)
    mha = model_shape(header(**{"general.architecture": "gpt2", "gpt2.block_count": 2,
                                "gpt2.embedding_length": 64, "gpt2.attention.head_count": 4}))
    assert mha.head_count_kv == (4, 4) and mha.key_length == 16  # no KV key: one KV head per head


def test_per_layer_kv_heads_and_explicit_lengths():
    shape = model_shape(header(**{
        "general.architecture": "hybrid", "hybrid.block_count": 4, "hybrid.embedding_length": 512,
        "hybrid.attention.head_count": 8,
        "hybrid.attention.head_count_kv": ArrayInfo(ValueType.UINT32, 4, (2, 0, 2, 0)),  # attention-free layers
        "hybrid.attention.key_length": 96, "hybrid.attention.value_length": 64,
    }))
    assert shape.head_count_kv == (2, 0, 2, 0) and (shape.key_length, shape.value_length) == (96, 64)
    assert kv_cache_bytes(shape, 256) == 2 * 2 * 256 * (96 + 64) * 2


@pytest.mark.parametrize("metadata,fragment", [
    ({}, "general.architecture"),
    ({"general.architecture": "llama"}, "llama.block_count"),
    ({"general.architecture": "llama", "llama.block_count": 2}, "llama.embedding_length"),
    ({"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64}, "head_count"),
    ({"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
      "llama.attention.head_count": 4, "llama.attention.head_count_kv": ArrayInfo(ValueType.INT32, 3, (1, 1, 1))},
     "one non-negative integer per layer"),
    ({"general.architecture": "llama", "llama.block_count": "two"}, "llama.block_count"),
])
def test_unusable_headers_fail_with_the_missing_key(metadata, fragment):
    result = model_shape(header(**metadata))
    assert isinstance(result, EstimateFailed) and fragment in result.message


def test_estimate_from_header_passes_parse_errors_through():
    failed = estimate_from_header(GGUFError("not a GGUF file"), 10, spec())
    assert failed == EstimateFailed("cannot read the model's GGUF header: not a GGUF file")


def test_estimate_from_a_real_gguf_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    from metal_agent.core.gguf_header import parse_header

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_tensor("w", np.zeros(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    e = estimate_from_header(parse_header(data), len(data), spec(context_size=4096))
    assert e.kv_bytes == 2 * 4096 * 1 * 32 * 2 * 2 and e.weights_bytes == len(data)


@pytest.mark.parametrize(("mode", "cache_gib"), [("chat", 1), ("embedding", 0), ("rerank", 0)])
def test_llama_server_estimate_counts_the_host_prompt_cache_its_command_line_allows(mode, cache_gib):
    """llama-server fills a host-RAM prompt cache up to --cache-ram (server_prompt_cache::update
    raises its token limit to the memory limit): the agent bounds it and admission counts it."""
    from metal_agent.core.engines.llama_server import LLAMA_SERVER, GGUFInputs
    from metal_agent.core.memory import GiB

    s = spec(mode=Mode(mode), context_size=8192)
    estimate = LLAMA_SERVER.estimate_with(GGUFInputs(LLAMA8B, 4 * GiB), s)
    without = estimate_memory(LLAMA8B, 4 * GiB, s)
    assert estimate.prompt_cache_bytes == cache_gib * GiB
    assert estimate.total_bytes == without.total_bytes + cache_gib * GiB
    assert ("prompt cache" in estimate.describe()) is bool(cache_gib)
