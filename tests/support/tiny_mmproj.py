"""Generate a tiny vision projector (mmproj) GGUF that llama-server loads beside the tiny model.

A LLaVA-style CLIP encoder (`clip.projector_type: mlp`): one transformer
block over 2x2 patches of a 32-pixel image, projected by `mm.0`/`mm.2` to the
tiny text model's 64-wide embeddings (llama.cpp's mtmd refuses a projector
whose output width differs from the text model's). Random weights: it proves
`--mmproj` reaches llama-server and is loaded, not that it sees anything. The
keys and tensor names are those llama.cpp's `tools/mtmd/clip.cpp` reads.

Run as a script to (re)build the cached file: `python -m tests.support.tiny_mmproj`.
"""

from __future__ import annotations

import os
from pathlib import Path

GENERATOR_VERSION = 1
TEXT_EMBD = 64  # tests/support/tiny_model.py DEFAULT.n_embd
EMBD, FF, HEADS, IMAGE, PATCH = 32, 64, 2, 32, 16


def ensure_mmproj(out_dir: Path | None = None) -> Path:
    from tests.support.tiny_model import default_cache_dir

    out_dir = out_dir or default_cache_dir()
    path = out_dir / f"tiny-mmproj-E{EMBD}-to{TEXT_EMBD}-v{GENERATOR_VERSION}.gguf"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        try:
            _write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _write(out: Path) -> None:
    import gguf
    import numpy as np

    rng = np.random.default_rng(4321)

    def weights(*dims: int) -> "np.ndarray":
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    def ones(n: int) -> "np.ndarray":
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> "np.ndarray":
        return np.zeros(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(out), arch="clip")
    writer.add_name("metal-agent tiny test projector")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.embedding_length", EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", FF)
    writer.add_uint32("clip.vision.block_count", 1)
    writer.add_uint32("clip.vision.projection_dim", TEXT_EMBD)
    writer.add_uint32("clip.vision.attention.head_count", HEADS)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_uint32("clip.vision.image_size", IMAGE)
    writer.add_uint32("clip.vision.patch_size", PATCH)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    n_pos = (IMAGE // PATCH) ** 2 + 1  # patches and the class embedding
    writer.add_tensor("v.patch_embd.weight", weights(EMBD, 3, PATCH, PATCH))
    writer.add_tensor("v.class_embd", weights(EMBD))
    writer.add_tensor("v.position_embd.weight", weights(n_pos, EMBD))
    for name, n in (("ln1", EMBD), ("ln2", EMBD)):
        writer.add_tensor(f"v.blk.0.{name}.weight", ones(n))
        writer.add_tensor(f"v.blk.0.{name}.bias", zeros(n))
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        writer.add_tensor(f"v.blk.0.{name}.weight", weights(EMBD, EMBD))
        writer.add_tensor(f"v.blk.0.{name}.bias", zeros(EMBD))
    writer.add_tensor("v.blk.0.ffn_up.weight", weights(FF, EMBD))
    writer.add_tensor("v.blk.0.ffn_up.bias", zeros(FF))
    writer.add_tensor("v.blk.0.ffn_down.weight", weights(EMBD, FF))
    writer.add_tensor("v.blk.0.ffn_down.bias", zeros(EMBD))
    writer.add_tensor("mm.0.weight", weights(TEXT_EMBD, EMBD))
    writer.add_tensor("mm.0.bias", zeros(TEXT_EMBD))
    writer.add_tensor("mm.2.weight", weights(TEXT_EMBD, TEXT_EMBD))
    writer.add_tensor("mm.2.bias", zeros(TEXT_EMBD))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    print(ensure_mmproj())
