"""Generate a tiny llama-architecture MLX model directory for the test suite.

The MLX counterpart of `tiny_model` (GGUF): a real model directory as
`mlx_lm.server` loads it (config.json, safetensors weights, tokenizer files),
two layers of hidden size 64 with seeded random weights and a small BPE
tokenizer trained on a fixed text with the `tokenizers` package. It answers
with junk, but the whole spawn -> load -> /health -> completion path runs for
real on MLX's Linux CPU build (`mlx[cpu]`).

The directory is written by `tokenizers` and `safetensors`' on-disk format
(written here with numpy and the 8-byte header rule, so generating needs no
MLX at all), then renamed into place whole, and cached like the GGUF under
~/.cache/metal-agent/models keyed by the shape and the generator version.

Run as a script to (re)build the cached model:
    python tests/support/tiny_mlx_model.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the generator's output changes, so caches keyed on it rebuild.
GENERATOR_VERSION = 1

# A fixed corpus: the tokenizer must come out the same on every machine.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "metal-agent serves language models from Apple Silicon Macs into a Kubernetes cluster.",
    "Hello! How are you today? I am fine, thank you. What is the weather like?",
    "user assistant system: say hello, answer briefly, count one two three four five.",
] * 8

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyMLXShape:
    n_layer: int = 2
    hidden: int = 64
    n_head: int = 2
    n_head_kv: int = 2
    intermediate: int = 128
    vocab: int = 384
    max_position: int = 4096
    seed: int = 4321


DEFAULT = TinyMLXShape()


def default_cache_dir() -> Path:
    root = os.environ.get("METAL_AGENT_CACHE") or os.path.expanduser("~/.cache/metal-agent")
    return Path(root) / "models"


def model_dir(shape: TinyMLXShape, out_dir: Path) -> Path:
    key = json.dumps({"shape": asdict(shape), "v": GENERATOR_VERSION}, sort_keys=True)
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    return out_dir / f"tiny-mlx-llama-L{shape.n_layer}-H{shape.hidden}-{short}"


def ensure_model(shape: TinyMLXShape = DEFAULT, out_dir: Path | None = None) -> Path:
    """The cached model directory for `shape`, generated first if needed (atomically)."""
    out_dir = out_dir or default_cache_dir()
    final = model_dir(shape, out_dir)
    if (final / "config.json").exists():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(shape, tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_safetensors(path: Path, tensors: dict) -> None:
    """numpy arrays -> a .safetensors file: u64 header length, JSON header, raw little-endian data."""
    dtypes = {"float32": "F32", "float16": "F16"}
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    blobs = []
    for name, array in tensors.items():
        data = array.tobytes()
        header[name] = {"dtype": dtypes[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _write(shape: TinyMLXShape, out: Path) -> None:
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape.vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|end|>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE, "model_max_length": shape.max_position,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>"}, indent=1))

    head_dim = shape.hidden // shape.n_head
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.hidden, "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head, "num_key_value_heads": shape.n_head_kv,
        "head_dim": head_dim, "intermediate_size": shape.intermediate, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": shape.max_position,
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("<|end|>"),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))

    rng = np.random.default_rng(shape.seed)

    def w(*dims: int):
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    kv = head_dim * shape.n_head_kv
    tensors = {"model.embed_tokens.weight": w(vocab, shape.hidden),
               "model.norm.weight": np.ones(shape.hidden, dtype=np.float32),
               "lm_head.weight": w(vocab, shape.hidden)}
    for i in range(shape.n_layer):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": np.ones(shape.hidden, dtype=np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(shape.hidden, dtype=np.float32),
            f"{p}.self_attn.q_proj.weight": w(shape.hidden, shape.hidden),
            f"{p}.self_attn.k_proj.weight": w(kv, shape.hidden),
            f"{p}.self_attn.v_proj.weight": w(kv, shape.hidden),
            f"{p}.self_attn.o_proj.weight": w(shape.hidden, shape.hidden),
            f"{p}.mlp.gate_proj.weight": w(shape.intermediate, shape.hidden),
            f"{p}.mlp.up_proj.weight": w(shape.intermediate, shape.hidden),
            f"{p}.mlp.down_proj.weight": w(shape.hidden, shape.intermediate),
        }
    write_safetensors(out / "model.safetensors", tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    print(ensure_model(DEFAULT, args.out_dir))


if __name__ == "__main__":
    main()
