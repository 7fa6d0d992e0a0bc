"""Read the metadata section of a GGUF file from bytes, without the `gguf` package.

Admission needs a handful of numbers from a model's header (layers, heads,
embedding width) to size its KV cache. The header sits at the start of the
file, before gigabytes of tensors, so the adapter hands us only a prefix of
the file and this module parses it. It is pure (bytes in, value out) and
total: garbage, a truncated prefix or a hostile length field all come back
as a `GGUFError` saying what is wrong, never as an exception, because a bad
file must become one service's status message, not a crashed agent.

Format (GGUF v2 and v3; v1 used 32-bit lengths and is long obsolete):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count × ( string key | u32 value_type | value )
    string = u64 length + UTF-8 bytes
    array  = u32 element_type + u64 count + elements

v3 also allows big-endian files; the byte order shows in the version field.

Arrays are skipped, not decoded: tokenizer vocabularies hold hundreds of
thousands of strings we never need. Fixed-size elements are skipped by
arithmetic; strings must be walked one length at a time (their sizes
differ), which is cheap next to decoding them. Short numeric arrays are kept,
because a few architectures store per-layer values (e.g. KV head counts,
where attention-free layers carry 0) as arrays.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Mapping, Union

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Plausibility limits: a length beyond these is garbage, not a big model.
# (Real headers: ~30-60 keys, vocabularies up to ~300k entries, chat
# templates of tens of KB.)
MAX_KV_COUNT = 1_000_000
MAX_TENSOR_COUNT = 100_000_000
MAX_KEY_BYTES = 65_535
MAX_STRING_BYTES = 64 << 20
MAX_ARRAY_COUNT = 1 << 32
MAX_ARRAY_DEPTH = 4
KEEP_ARRAY_VALUES = 4096  # numeric arrays up to this length are decoded (per-layer values)


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALARS: dict[ValueType, str] = {
    ValueType.UINT8: "B",
    ValueType.INT8: "b",
    ValueType.UINT16: "H",
    ValueType.INT16: "h",
    ValueType.UINT32: "I",
    ValueType.INT32: "i",
    ValueType.FLOAT32: "f",
    ValueType.BOOL: "?",
    ValueType.UINT64: "Q",
    ValueType.INT64: "q",
    ValueType.FLOAT64: "d",
}


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """An array value: its element type and length; `values` only for short numeric arrays."""

    element_type: ValueType
    count: int
    values: tuple[int | float | bool, ...] | None = None


Scalar = Union[int, float, bool, str]
Value = Union[Scalar, ArrayInfo]


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    version: int
    byte_order: str  # "little" or "big"
    tensor_count: int
    metadata: Mapping[str, Value] = field(default_factory=dict)
    size: int = 0  # bytes from the start of the file to the end of the metadata section


@dataclass(frozen=True, slots=True)
class GGUFError:
    """Why the bytes are not a GGUF header we can read.

    `truncated` means the input ended inside the header: the same file read
    further may parse. `needed` is then a lower bound on the prefix length
    that could succeed, so a reader knows how much more to fetch.
    """

    message: str
    truncated: bool = False
    needed: int | None = None


class _Stop(Exception):
    """Internal: abandons the parse; converted to a `GGUFError` at the boundary."""

    def __init__(self, error: GGUFError) -> None:
        self.error = error


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview, order: str) -> None:
        self.buf = memoryview(data)
        self.pos = 0
        self.order = order  # struct prefix "<" or ">"

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if end > len(self.buf):
            raise _Stop(GGUFError(f"input ends inside {what} (at byte {self.pos}, {n} bytes needed)",
                                  truncated=True, needed=end))

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(self.order + fmt)
        self.need(size, what)
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str, limit: int) -> str:
        length = self.unpack("Q", f"the length of {what}")
        if length > limit:
            raise _Stop(GGUFError(f"{what} claims {length} bytes, which is not plausible; the file is corrupt"))
        self.need(length, what)
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value_type(self, what: str) -> ValueType:
        code = self.unpack("I", f"the type of {what}")
        try:
            return ValueType(code)
        except ValueError:
            raise _Stop(GGUFError(f"{what} has unknown value type {code}; the file is corrupt")) from None

    def value(self, vtype: ValueType, what: str, depth: int = 0) -> Value:
        if vtype is ValueType.STRING:
            return self.string(what, MAX_STRING_BYTES)
        if vtype is ValueType.ARRAY:
            return self.array(what, depth)
        return self.unpack(_SCALARS[vtype], what)

    def array(self, what: str, depth: int) -> ArrayInfo:
        if depth >= MAX_ARRAY_DEPTH:
            raise _Stop(GGUFError(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}; the file is corrupt"))
        etype = self.value_type(f"the elements of {what}")
        count = self.unpack("Q", f"the length of {what}")
        if count > MAX_ARRAY_COUNT:
            raise _Stop(GGUFError(f"{what} claims {count} elements, which is not plausible; the file is corrupt"))
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            size = count * struct.calcsize(fmt)
            self.need(size, what)
            values = None
            if count <= KEEP_ARRAY_VALUES:
                values = struct.unpack_from(f"{self.order}{count}{fmt}", self.buf, self.pos)
            self.pos += size
            return ArrayInfo(etype, count, values)
        if etype is ValueType.STRING:
            self.skip_strings(count, what)
        else:
            for i in range(count):
                self.array(f"element {i} of {what}", depth + 1)
        return ArrayInfo(etype, count)

    def skip_strings(self, count: int, what: str) -> None:
        """Walk `count` length-prefixed strings: the hot loop of big vocabularies, kept tight."""
        length_at = struct.Struct(self.order + "Q").unpack_from
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, f"element {i} of {what}")
            length = length_at(buf, pos)[0]
            if length > MAX_STRING_BYTES:
                raise _Stop(GGUFError(f"element {i} of {what} claims {length} bytes; the file is corrupt"))
            pos += 8 + length
        if pos > end:
            raise _Stop(GGUFError(f"input ends inside {what}", truncated=True, needed=pos))
        self.pos = pos


def _byte_order(data: bytes | bytearray | memoryview) -> tuple[str, int] | GGUFError:
    if len(data) < 8:
        if bytes(data[:4]) != MAGIC[: min(4, len(data))]:
            return GGUFError("not a GGUF file (wrong magic bytes)")
        return GGUFError("input ends inside the GGUF preamble", truncated=True, needed=24)
    if bytes(data[:4]) != MAGIC:
        return GGUFError(f"not a GGUF file (starts with {bytes(data[:4])!r}, expected b'GGUF')")
    little = struct.unpack_from("<I", data, 4)[0]
    big = struct.unpack_from(">I", data, 4)[0]
    if little in SUPPORTED_VERSIONS:
        return "<", little
    if big in SUPPORTED_VERSIONS:
        return ">", big
    version = little if little < big else big
    if version == 1:
        return GGUFError("GGUF version 1 is not supported (obsolete since 2023); re-convert the model")
    return GGUFError(f"unsupported GGUF version {version} (this agent reads versions 2 and 3)")


def parse_header(data: bytes | bytearray | memoryview) -> GGUFHeader | GGUFError:
    """Parse the header and every metadata key from a prefix of a GGUF file.

    Give at least the whole metadata section; if the prefix is too short the
    result is a `GGUFError` with `truncated=True` and a `needed` hint.
    Duplicate keys keep the last value, as llama.cpp does.
    """
    order = _byte_order(data)
    if isinstance(order, GGUFError):
        return order
    prefix, version = order
    reader = _Reader(data, prefix)
    reader.pos = 8
    try:
        tensor_count = reader.unpack("Q", "the tensor count")
        kv_count = reader.unpack("Q", "the metadata count")
        if tensor_count > MAX_TENSOR_COUNT:
            return GGUFError(f"header claims {tensor_count} tensors, which is not plausible; the file is corrupt")
        if kv_count > MAX_KV_COUNT:
            return GGUFError(f"header claims {kv_count} metadata keys, which is not plausible; the file is corrupt")
        metadata: dict[str, Value] = {}
        for i in range(kv_count):
            key = reader.string(f"the name of metadata key {i}", MAX_KEY_BYTES)
            what = f"metadata key {key!r}"
            metadata[key] = reader.value(reader.value_type(what), what)
    except _Stop as stop:
        return stop.error
    return GGUFHeader(version=version, byte_order="little" if prefix == "<" else "big",
                      tensor_count=tensor_count, metadata=metadata, size=reader.pos)
