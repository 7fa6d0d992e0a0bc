"""The GGUF header reader against files written by the reference `gguf` package.

`gguf` (llama.cpp's own Python writer) is a test-only dependency: it writes
the files, our parser must read them. Truncated and garbage inputs must come
back as a `GGUFError`, never as an exception.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from metal_agent.core.gguf_header import ArrayInfo, GGUFError, GGUFHeader, ValueType, parse_header
from tests.support.gguf_forge import written_by_gguf

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")


def written(tmp_path: Path, *, big_endian: bool = False, small: bool = False) -> bytes:
    def fill(w) -> None:
        w.add_context_length(4096)
        w.add_uint8("t.u8", 250)
        w.add_int8("t.i8", -100)
        w.add_uint16("t.u16", 65000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -2_000_000_000)
        w.add_float32("t.f32", 0.5)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "naïve ✓")
        w.add_uint64("t.u64", 2**63 + 5)
        w.add_int64("t.i64", -(2**62))
        w.add_float64("t.f64", 1e-300)
        w.add_array("t.ints", [3, 1, 4, 1, 5])
        w.add_array("t.nested", [[1, 2], [3, 4, 5]])
        w.add_array("t.few", ["a", "bc"])
        if not small:
            w.add_array("t.floats", [0.25] * 5000)  # longer than kept: skipped by arithmetic
            w.add_array("t.strings", [f"piece{i}" for i in range(3000)])

    return written_by_gguf(tmp_path / "m.gguf", fill, big_endian=big_endian)


@pytest.mark.parametrize("big_endian", [False, True], ids=["little-endian", "big-endian"])
def test_every_value_type_reads_like_the_reference_reader(tmp_path, big_endian):
    data = written(tmp_path, big_endian=big_endian)
    header = parse_header(data)
    assert isinstance(header, GGUFHeader), header
    assert header.version == 3 and header.tensor_count == 1
    assert header.byte_order == ("big" if big_endian else "little")
    md = header.metadata
    assert md["general.architecture"] == "llama"
    assert (md["llama.block_count"], md["llama.embedding_length"]) == (4, 256)
    assert (md["llama.attention.head_count"], md["llama.attention.head_count_kv"]) == (8, 2)
    assert md["t.u8"] == 250 and md["t.i8"] == -100 and md["t.u16"] == 65000 and md["t.i16"] == -30000
    assert md["t.u32"] == 4_000_000_000 and md["t.i32"] == -2_000_000_000
    assert md["t.f32"] == 0.5 and md["t.bool"] is True and md["t.str"] == "naïve ✓"
    assert md["t.u64"] == 2**63 + 5 and md["t.i64"] == -(2**62) and md["t.f64"] == 1e-300
    assert md["t.ints"] == ArrayInfo(ValueType.INT32, 5, (3, 1, 4, 1, 5))
    assert md["t.floats"] == ArrayInfo(ValueType.FLOAT32, 5000, None)
    assert md["t.strings"] == ArrayInfo(ValueType.STRING, 3000, None)
    assert md["t.nested"].element_type is ValueType.ARRAY and md["t.nested"].count == 2

    if not big_endian:  # the reference reader: same keys, and our header ends where its tensor infos begin
        reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
        assert set(md) == {k for k in reader.fields if not k.startswith("GGUF.")}


def test_version_2_reads_and_version_1_is_refused_by_name(tmp_path):
    data = bytearray(written(tmp_path))
    struct.pack_into("<I", data, 4, 2)
    v2 = parse_header(bytes(data))
    assert isinstance(v2, GGUFHeader) and v2.version == 2 and v2.metadata["llama.block_count"] == 4
    struct.pack_into("<I", data, 4, 1)
    v1 = parse_header(bytes(data))
    assert isinstance(v1, GGUFError) and "version 1" in v1.message and not v1.truncated
    struct.pack_into("<I", data, 4, 7)
    assert "unsupported GGUF version 7" in parse_header(bytes(data)).message


def test_every_truncation_is_reported_as_truncated_with_a_hint(tmp_path):
    data = written(tmp_path, small=True)
    full = parse_header(data)
    for cut in range(full.size):
        result = parse_header(data[:cut])
        assert isinstance(result, GGUFError), cut
        assert result.truncated, (cut, result)
        assert result.needed is not None and cut < result.needed <= full.size, (cut, result)
    assert parse_header(data[:full.size]) == full


def _kv_prefix(count: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, count)


def _key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


@pytest.mark.parametrize("data,fragment", [
    (b"", "truncated"),
    (b"GGML\x03\x00\x00\x00", "not a GGUF file"),
    (b"PK\x03\x04 a zip file, not a model....", "not a GGUF file"),
    (_kv_prefix() + _key(b"k") + struct.pack("<I", 99), "unknown value type 99"),
    (_kv_prefix() + struct.pack("<Q", 2**40), "not plausible"),
    (_kv_prefix() + _key(b"k") + struct.pack("<IQ", 8, 2**50), "not plausible"),
    (_kv_prefix() + _key(b"k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5, "deeper than"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62), "not plausible"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "not plausible"),
])
def test_garbage_is_described(data, fragment):
    result = parse_header(data)
    assert isinstance(result, GGUFError)
    if fragment == "truncated":
        assert result.truncated
    else:
        assert fragment in result.message, result.message


def test_random_garbage_never_raises():
    rng = random.Random(20240607)
    for _ in range(3000):
        size = rng.randrange(0, 200)
        blob = bytes(rng.randrange(256) for _ in range(size))
        if rng.random() < 0.7:
            blob = b"GGUF" + struct.pack("<I", rng.choice([2, 3])) + blob
        assert isinstance(parse_header(blob), (GGUFHeader, GGUFError))


def test_duplicate_keys_keep_the_last_value():
    data = (_kv_prefix(2) + _key(b"a") + struct.pack("<II", 4, 1) + _key(b"a") + struct.pack("<II", 4, 2))
    header = parse_header(data)
    assert isinstance(header, GGUFHeader) and header.metadata == {"a": 2} and header.size == len(data)
