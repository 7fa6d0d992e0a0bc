"""Build GGUF headers byte by byte, honest or hostile, for the parser's tests and bench.

The `gguf` package writes only what llama.cpp would write; an attacker writes
whatever bytes they like. These helpers spell out the format (magic, version,
counts, then key/type/value triples) so a test can build the shapes that cost
a parser the most per byte: one huge key named in every error description,
arrays of arrays, oceans of empty strings, many tiny keys, strings of invalid
UTF-8. `SHAPES` lists the named worst cases the bench and the fuzz test share.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FORMATS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
            U64: "Q", I64: "q", F64: "d"}

MiB = 1 << 20


def preamble(kv_count: int, tensor_count: int = 0, version: int = 3, order: str = "<") -> bytes:
    return b"GGUF" + struct.pack(order + "IQQ", version, tensor_count, kv_count)


def string(raw: bytes | str, order: str = "<") -> bytes:
    raw = raw.encode() if isinstance(raw, str) else raw
    return struct.pack(order + "Q", len(raw)) + raw


def scalar(vtype: int, value, order: str = "<") -> bytes:
    return struct.pack(order + _FORMATS[vtype], value)


def array_head(element_type: int, count: int, order: str = "<") -> bytes:
    return struct.pack(order + "IQ", element_type, count)


def kv(key: bytes | str, vtype: int, payload: bytes, order: str = "<") -> bytes:
    """One metadata entry: `payload` is the value's bytes as the type lays them out."""
    return string(key, order) + struct.pack(order + "I", vtype) + payload


def header(entries: list[bytes] | tuple[bytes, ...], *, tensor_count: int = 0, order: str = "<") -> bytes:
    return preamble(len(entries), tensor_count, order=order) + b"".join(entries)


def llama_header(layers: int = 2, embd: int = 64, heads: int = 2, kv_heads: int = 2) -> list[bytes]:
    """The keys an estimate needs, as a real llama GGUF carries them."""
    return [
        kv("general.architecture", STRING, string("llama")),
        kv("llama.block_count", U32, scalar(U32, layers)),
        kv("llama.embedding_length", U32, scalar(U32, embd)),
        kv("llama.attention.head_count", U32, scalar(U32, heads)),
        kv("llama.attention.head_count_kv", U32, scalar(U32, kv_heads)),
    ]


# -- the hostile shapes ------------------------------------------------------------------------

def nested_key_attack(elements: int = 20_000, key_bytes: int = 65_535, fill: bytes = b"\x00") -> bytes:
    """Issue 20's attack: a 64 KiB key whose value is an array of `elements` empty arrays.

    A parser that names "element i of metadata key '<64 KiB>'" in a description
    string for every element copies the key's repr several times per element;
    NUL bytes make that repr four times the key ('\\x00')."""
    key = fill * key_bytes
    body = array_head(ARRAY, elements) + array_head(U8, 0) * elements
    return header([*llama_header(), kv(key, ARRAY, body)])


def _fill(size: int, fixed: int, each: int) -> int:
    return max(0, (size - fixed) // each)


def many_tiny_kvs(size: int) -> bytes:
    """As many one-byte keys with a u8 value as fit in `size` bytes (14 bytes each)."""
    one = kv(b"k", U8, b"\x00")
    n = _fill(size, 24, len(one))
    return preamble(n) + one * n


def empty_strings(size: int) -> bytes:
    """One key whose value is an array of empty strings filling `size` (8 bytes each)."""
    fixed = len(header(llama_header())) + 8 + 1 + 4 + 12
    n = _fill(size, fixed, 8)
    return header([*llama_header(), kv(b"t", ARRAY, array_head(STRING, n) + b"\x00" * 8 * n)])


def empty_arrays(size: int, key_bytes: int = 65_535) -> bytes:
    """`nested_key_attack` grown to `size` bytes: an array of empty arrays (12 bytes each)."""
    fixed = len(header(llama_header())) + 8 + key_bytes + 4 + 12
    return nested_key_attack(_fill(size, fixed, 12), key_bytes)


def deep_nesting(size: int, depth: int = 4) -> bytes:
    """Arrays of arrays `depth` levels down, each level one element, the innermost empty,
    repeated at the top level until `size` is filled."""
    inner = array_head(U8, 0)
    for _ in range(depth - 2):
        inner = array_head(ARRAY, 1) + inner
    fixed = len(header(llama_header())) + 8 + 1 + 4 + 12
    n = _fill(size, fixed, len(inner))
    return header([*llama_header(), kv(b"d", ARRAY, array_head(ARRAY, n) + inner * n)])


def huge_string(size: int) -> bytes:
    """One string value of invalid UTF-8 (0xff bytes) filling `size`."""
    fixed = len(header(llama_header())) + 8 + 1 + 4 + 8
    n = _fill(size, fixed, 1)
    return header([*llama_header(), kv(b"s", STRING, string(b"\xff" * n))])


def huge_keys(size: int, key_bytes: int = 65_535) -> bytes:
    """Keys of `key_bytes` invalid UTF-8 bytes, each with a u8 value, filling `size`."""
    one_len = 8 + key_bytes + 4 + 1
    n = _fill(size, 24, one_len)
    return preamble(n) + b"".join(kv(i.to_bytes(4, "little") + b"\xff" * (key_bytes - 4), U8, b"\x00")
                                  for i in range(n))


def short_numeric_arrays(size: int, count: int = 4096) -> bytes:
    """Many keys each holding a short u8 array (short enough that a parser may decode it)."""
    one_len = 8 + 8 + 4 + 12 + count
    n = _fill(size, 24, one_len)
    return preamble(n) + b"".join(kv(b"a%07d" % i, ARRAY, array_head(U8, count) + b"\x01" * count) for i in range(n))


def nested_numeric_arrays(size: int, count: int = 4096) -> bytes:
    """One array of short u8 arrays filling `size`."""
    one = array_head(U8, count) + b"\x01" * count
    fixed = len(header(llama_header())) + 8 + 1 + 4 + 12
    n = _fill(size, fixed, len(one))
    return header([*llama_header(), kv(b"n", ARRAY, array_head(ARRAY, n) + one * n)])


def claims_beyond(size: int) -> bytes:
    """An array of empty strings that claims twice as many elements as `size` holds: a reader
    keeps fetching more of the file (the zeros after it read as more empty strings) up to its limit."""
    fixed = len(header(llama_header())) + 8 + 1 + 4 + 12
    n = _fill(size, fixed, 8)
    return header([*llama_header(), kv(b"t", ARRAY, array_head(STRING, 2 * n) + b"\x00" * 8 * n)])


def tiny_string_kvs(size: int) -> bytes:
    """Many one-byte keys holding empty string values (21 bytes each)."""
    one = kv(b"k", STRING, string(b""))
    n = _fill(size, 24, len(one))
    return preamble(n) + one * n


def every_budget_at_once(size: int) -> bytes:
    """Each of the agent parser's budgets used up to just below its limit in one header,
    padded to `size` with numeric arrays: empty strings walked, arrays inside an array,
    64 KiB keys of invalid UTF-8, 4096-value arrays decoded, then bulk to step over."""
    from metal_agent.core import gguf_header as g

    # (defaults: the limits as first set, so the bench can run this against an older parser)
    keys = getattr(g, "MAX_DECODED_BYTES", 8 << 20) // 65_536 - 2
    pads = 1 + size // (1 << 24)
    strings = getattr(g, "MAX_WORK", 2 << 20) - 4 * (len(llama_header()) + 2 + keys + 15 + pads + 1) - 1000
    nested = getattr(g, "MAX_NESTED_ARRAYS", 1 << 16) - 1
    entries = [*llama_header()]
    entries.append(kv(b"s", ARRAY, array_head(STRING, strings) + b"\x00" * 8 * strings))
    entries.append(kv(b"n", ARRAY, array_head(ARRAY, nested) + array_head(U8, 0) * nested))
    entries += [kv(i.to_bytes(2, "little") + b"\xff" * 65_533, U8, b"\x00") for i in range(keys)]
    entries += [kv(b"v%02d" % i, ARRAY, array_head(U8, 4096) + b"\x01" * 4096) for i in range(15)]
    pad, chunk = size - len(header(entries)), 1 << 24
    while pad > 25:
        n = min(chunk, pad - 25)
        entries.append(kv(b"p", ARRAY, array_head(U8, n) + b"\x00" * n))
        pad -= 25 + n
    return header(entries)


#: name -> builder of a header of about `size` bytes; the bench runs each at 8 and 128 MiB.
SHAPES: dict[str, Callable[[int], bytes]] = {
    "nested arrays, 64 KiB key": empty_arrays,
    "many tiny keys": many_tiny_kvs,
    "many empty string values": tiny_string_kvs,
    "array of empty strings": empty_strings,
    "deep nesting": deep_nesting,
    "one huge invalid-UTF-8 string": huge_string,
    "64 KiB invalid-UTF-8 keys": huge_keys,
    "many short numeric arrays": short_numeric_arrays,
    "nested short numeric arrays": nested_numeric_arrays,
    "string array claiming 2x its bytes": claims_beyond,
    "every budget at once": every_budget_at_once,
}


def written_by_gguf(path: Path, fill: Callable[[Any], None], *, big_endian: bool = False,
                    tensor_elements: int = 64) -> bytes:
    """The bytes of a file the reference `gguf` package writes: a small llama's shape (4 layers,
    256 wide, 8 heads, 2 KV heads), then whatever `fill(writer)` adds, then one f32 tensor.
    The honest counterpart of the forged headers above, to compare readers on."""
    import gguf
    import numpy as np

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_block_count(4)
    w.add_embedding_length(256)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    fill(w)
    w.add_tensor("weight", np.ones(tensor_elements, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()
