"""How much memory a llama-server for one InferenceService will take.

On Apple Silicon the GPU shares the Mac's RAM, so "does this model fit" is
one number: weights + KV cache + working buffers. We estimate it before
spawning so that a model too large for what is left is refused with a
message, instead of being started and dragging the whole Mac into swap.

    estimate = weights + KV cache + overhead (+ host prompt cache)

* **weights** = the GGUF file size. llama.cpp maps the file and the Metal
  backend wires those pages; tensor data is by far the largest part of the
  file, and the few MB of metadata are noise at this scale.
* **KV cache** = Σ over layers of ctx × kv_heads(layer) × (key_length ×
  bytes(K) + value_length × bytes(V)). `key_length`/`value_length` default
  to embedding_length / head_count (the head dimension). The context is the
  service's `contextSize`, rounded up to a multiple of 256 as llama.cpp pads
  it. `parallelSlots` does not multiply it: llama-server divides the one
  context between its slots. Quantized cache types store blocks (q8_0: 32
  values in 34 bytes), so their per-element cost is a fraction.
* **overhead** = max(256 MiB, 5 % of weights). This covers llama.cpp's
  compute buffers (the graph's intermediate tensors, sized by batch and
  model width, a few hundred MiB for 7-8B models with flash attention on),
  the logits/embedding output buffer, Metal's command buffers and the
  process itself. Measured compute buffers grow roughly with model width,
  hence the proportional part for large models; the floor keeps small
  models from being under-counted, where fixed costs dominate.

* **host prompt cache** = the `--cache-ram` limit the command line sets
  (`core.argv.prompt_cache_mib`): llama-server copies finished prompts' KV
  states into host RAM and lets that cache grow to its limit, which on a Mac
  is the same memory the models use. 0 for embedding and rerank.

The estimate is deliberately a little conservative (no sliding-window or
MLA savings, attention-free recurrent state not counted separately): a
refusal can be fixed by the user, an out-of-memory Mac cannot.

LLMKube's agent, as we model it, uses **file size × 1.2**, a flat 20 % for
KV and everything else, ignoring context length and cache type. We do not
have its exact formula; `llmkube_estimate` encodes that assumption so the
difference can be shown in tests. The practical difference: ours grows with
`contextSize` (a 128k context can need more memory than the weights) and
shrinks with quantized KV caches (q8_0 roughly halves the cache, turbo3
quarters it); LLMKube's cannot see either, so it admits long-context
services that then swap, and refuses quantized-cache ones that would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from metal_agent.core.api import InferenceServiceSpec
from metal_agent.core.gguf_header import ArrayInfo, GGUFError, GGUFHeader

MiB = 1 << 20
GiB = 1 << 30

OVERHEAD_FLOOR_BYTES = 256 * MiB
OVERHEAD_FRACTION = Fraction(5, 100)
CONTEXT_PAD = 256
MAX_BLOCK_COUNT = 4096  # layers; real models have up to a few hundred (a header's claim is summed per layer)
DEFAULT_CACHE_TYPE = "f16"

# Bytes per cached element. Block formats: (bytes per block) / (values per block).
CACHE_TYPE_BYTES: dict[str, Fraction] = {
    "f32": Fraction(4),
    "f16": Fraction(2),
    "bf16": Fraction(2),
    "q8_0": Fraction(34, 32),
    "q5_0": Fraction(22, 32),
    "q5_1": Fraction(24, 32),
    "q4_0": Fraction(18, 32),
    "q4_1": Fraction(20, 32),
    "iq4_nl": Fraction(18, 32),
    "turbo3": Fraction(13, 32),  # 3.25 bits per value, TurboQuant builds
    "turbo4": Fraction(17, 32),  # 4.25 bits per value
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The header numbers that size a KV cache. Per-layer tuples have `block_count` entries."""

    architecture: str
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: tuple[int, ...]
    key_length: int
    value_length: int
    context_length: int | None = None  # trained context, for information


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    context: int
    cache_type_k: str
    cache_type_v: str
    notes: tuple[str, ...] = ()
    prompt_cache_bytes: int = 0  # llama-server's host prompt cache limit (--cache-ram)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes + self.prompt_cache_bytes

    def describe(self) -> str:
        """E.g. "4.58 GiB weights + 1.00 GiB KV (ctx 8192, f16/f16) + 0.25 GiB overhead + 1.00 GiB prompt
        cache = 6.83 GiB" (the prompt cache only when there is one)."""
        cache = f" + {gib(self.prompt_cache_bytes)} prompt cache" if self.prompt_cache_bytes else ""
        return (f"{gib(self.weights_bytes)} weights + {gib(self.kv_bytes)} KV (ctx {self.context}, "
                f"{self.cache_type_k}/{self.cache_type_v}) + {gib(self.overhead_bytes)} overhead{cache} = "
                f"{gib(self.total_bytes)}")


@dataclass(frozen=True, slots=True)
class EstimateFailed:
    """The estimate could not be computed; `message` says why (shown to the user)."""

    message: str


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def _int(metadata, key: str) -> int | None:
    value = metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _per_layer(metadata, key: str, layers: int) -> tuple[int, ...] | str | None:
    """A scalar repeated per layer, a per-layer array as is, None when absent, str on error."""
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, ArrayInfo):
        if value.values is None or len(value.values) != layers or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values):
            return f"{key} is an array that is not one non-negative integer per layer"
        return tuple(value.values)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"{key} is not a non-negative integer"
    return (value,) * layers


def model_shape(header: GGUFHeader) -> ModelShape | EstimateFailed:
    """Pull the KV-relevant numbers out of a parsed header."""
    md = header.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return EstimateFailed("the GGUF header has no general.architecture")
    layers = _int(md, f"{arch}.block_count")
    embedding = _int(md, f"{arch}.embedding_length")
    if not layers or layers <= 0:
        return EstimateFailed(f"the GGUF header has no usable {arch}.block_count")
    if layers > MAX_BLOCK_COUNT:  # the KV sum below runs once per layer
        return EstimateFailed(f"the GGUF header claims {layers} layers ({arch}.block_count), which is not "
                              f"plausible (at most {MAX_BLOCK_COUNT})")
    if not embedding or embedding <= 0:
        return EstimateFailed(f"the GGUF header has no usable {arch}.embedding_length")

    heads = _per_layer(md, f"{arch}.attention.head_count", layers)
    if heads is None or isinstance(heads, str) or not any(heads):
        return EstimateFailed(heads if isinstance(heads, str) else f"the GGUF header has no usable {arch}.attention.head_count")
    kv_heads = _per_layer(md, f"{arch}.attention.head_count_kv", layers)
    if isinstance(kv_heads, str):
        return EstimateFailed(kv_heads)
    if kv_heads is None:
        kv_heads = heads  # absent means no grouped-query attention: one KV head per head

    # Without explicit lengths the head dimension is width / heads. With
    # per-layer head counts use the smallest (non-zero) count: the largest
    # head dimension, i.e. the conservative choice.
    head_dim = embedding // min(h for h in heads if h > 0)
    key_length = _int(md, f"{arch}.attention.key_length") or head_dim
    value_length = _int(md, f"{arch}.attention.value_length") or head_dim
    return ModelShape(
        architecture=arch, block_count=layers, embedding_length=embedding, head_count=max(heads),
        head_count_kv=kv_heads, key_length=key_length, value_length=value_length,
        context_length=_int(md, f"{arch}.context_length"),
    )


def cache_type_bytes(cache_type: str | None) -> tuple[str, Fraction, str | None]:
    """(type name, bytes per element, note) for a `cacheType*` value; None means llama.cpp's f16."""
    name = (cache_type or DEFAULT_CACHE_TYPE).lower()
    if name in CACHE_TYPE_BYTES:
        return name, CACHE_TYPE_BYTES[name], None
    note = f"unknown KV cache type {cache_type!r}: counted as f16 (2 bytes per value) to stay conservative"
    return name, CACHE_TYPE_BYTES[DEFAULT_CACHE_TYPE], note


def padded_context(context: int) -> int:
    return max(CONTEXT_PAD, math.ceil(context / CONTEXT_PAD) * CONTEXT_PAD)


def kv_cache_bytes(shape: ModelShape, context: int, cache_type_k: str | None = None,
                   cache_type_v: str | None = None) -> int:
    """KV cache size in bytes for `context` tokens (rounded up to llama.cpp's padding)."""
    _, k_bytes, _ = cache_type_bytes(cache_type_k)
    _, v_bytes, _ = cache_type_bytes(cache_type_v)
    per_token = sum(kv * (shape.key_length * k_bytes + shape.value_length * v_bytes) for kv in shape.head_count_kv)
    return math.ceil(per_token * padded_context(context))


def overhead_bytes(weights_bytes: int) -> int:
    return max(OVERHEAD_FLOOR_BYTES, math.ceil(weights_bytes * OVERHEAD_FRACTION))


def estimate_memory(shape: ModelShape, weights_bytes: int, spec: InferenceServiceSpec,
                    prompt_cache_bytes: int = 0) -> MemoryEstimate:
    """Memory for one service: its model's weights, its KV cache, the working overhead and the host
    prompt cache its command line allows (`prompt_cache_bytes`, from `core.argv.prompt_cache_mib`)."""
    k_name, _, k_note = cache_type_bytes(spec.effective_cache_type_k)
    v_name, _, v_note = cache_type_bytes(spec.effective_cache_type_v)
    notes = tuple(dict.fromkeys(n for n in (k_note, v_note) if n))
    return MemoryEstimate(
        weights_bytes=weights_bytes,
        kv_bytes=kv_cache_bytes(shape, spec.context_size, spec.effective_cache_type_k, spec.effective_cache_type_v),
        overhead_bytes=overhead_bytes(weights_bytes),
        context=padded_context(spec.context_size),
        cache_type_k=k_name,
        cache_type_v=v_name,
        notes=notes,
        prompt_cache_bytes=prompt_cache_bytes,
    )


def estimate_from_header(header: GGUFHeader | GGUFError, weights_bytes: int,
                         spec: InferenceServiceSpec) -> MemoryEstimate | EstimateFailed:
    """`estimate_memory` from a header parse result, carrying any parse problem through."""
    if isinstance(header, GGUFError):
        return EstimateFailed(f"cannot read the model's GGUF header: {header.message}")
    shape = model_shape(header)
    if isinstance(shape, EstimateFailed):
        return shape
    return estimate_memory(shape, weights_bytes, spec)


def llmkube_estimate(weights_bytes: int) -> int:
    """Our model of LLMKube's estimate: file size plus a flat 20 % (see the module docstring)."""
    return math.ceil(weights_bytes * Fraction(6, 5))
