"""Read the metadata section of a GGUF file from bytes, without the `gguf` package.

Admission needs a handful of numbers from a model's header (layers, heads,
embedding width) to size its KV cache. The header sits at the start of the
file, before gigabytes of tensors, so the parser reads only a prefix of the
file. It is pure (bytes in, value out; `read_header_from` pulls more bytes
through a callable it is given) and total: garbage, a truncated prefix or a
hostile length field all come back as a `GGUFError` saying what is wrong,
never as an exception, because a bad file must become one service's status
message, not a crashed agent.

Format (GGUF v2 and v3; v1 used 32-bit lengths and is long obsolete):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count × ( string key | u32 value_type | value )
    string = u64 length + UTF-8 bytes
    array  = u32 element_type + u64 count + elements

v3 also allows big-endian files; the byte order shows in the version field.

The file is written by whoever wrote the Model's source, so the parser is
built to cost time in proportion to its input and never more than a fixed
budget, whatever the bytes say (issue 20: a 64 KiB key named in a
description string built for every element of a nested array cost 0.8 ms an
element; a 128 MiB header of empty strings took seconds):

* **Nothing is described until something is wrong.** No message text is
  built on the way; an error names where it happened as it propagates
  (`_Stop.inside`), once, with long keys shortened.
* **Linear in the bytes, bounded in the work.** Fixed-size array elements are
  skipped by arithmetic; strings inside arrays are walked one length at a
  time in a tight loop; arrays of arrays (which llama.cpp refuses to load)
  are walked one by one. Each walked item, metadata key and nested array
  costs units of one budget (`MAX_WORK`), charged before the walk starts, so
  a claim beyond it is refused at once rather than after the work.
* **Caps well above real models.** Real headers: 30-100 keys; vocabularies
  up to 262,144 tokens plus up to ~515k merges (Gemma 3), so under a million
  walked strings; chat templates of tens of KB; per-layer arrays of a few
  hundred values. The caps below leave a wide margin (see each constant).
* **Decoding is budgeted too.** Keys and string values are decoded (UTF-8,
  invalid bytes replaced) up to `MAX_DECODED_BYTES` in total; a string value
  longer than `KEEP_STRING_BYTES`, or past the budget, is kept as its length
  (`StringInfo`) since nothing reads such values. Numeric arrays of at most
  `KEEP_ARRAY_VALUES` elements are decoded (architectures store per-layer
  values such as KV head counts that way), up to `MAX_KEPT_VALUES` in all.
* **One pass over a window.** `read_header_from` reads the file in windows
  (1 MiB, or what one value needs) and steps over what it skips without
  reading it (fixed-size arrays, the text of strings inside arrays, long
  strings): the bytes read are the bytes looked at, memory is one window,
  and nothing is parsed twice. The metadata must end within `limit`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Mapping, Union

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Plausibility limits: a length beyond these is garbage, not a big model.
MAX_KV_COUNT = 1 << 16  # metadata keys (real: 30-100)
MAX_TENSOR_COUNT = 100_000_000  # only a number here: tensor infos follow the metadata and are never read
MAX_KEY_BYTES = 65_535  # the GGUF spec's own limit on a key
MAX_STRING_BYTES = 64 << 20  # one string (chat templates: tens of KB; an embedded tokenizer.json: MBs)
MAX_ARRAY_COUNT = 1 << 24  # elements of one array (vocabularies: up to 262,144)
MAX_ARRAY_DEPTH = 4  # arrays inside arrays (llama.cpp loads none; gguf-py writes them)

# The work budget, in units of one walked string (~0.05-0.2 µs of CPU each;
# a metadata key costs 4). Real headers use under 1M units (Gemma 3: 262k
# tokens + 515k merges); 2M caps a hostile one at a fraction of a second.
MAX_WORK = 2 << 20
KEY_COST = 4
# Arrays inside arrays, in all: walked one by one at ~1-3 µs each. llama.cpp
# refuses to load any ("invalid GGUF type 9"), gguf-py writes and reads them.
MAX_NESTED_ARRAYS = 1 << 16

MAX_DECODED_BYTES = 8 << 20  # keys and string values decoded, in all
KEEP_STRING_BYTES = 1 << 20  # longer string values are kept as their length
KEEP_ARRAY_VALUES = 4096  # numeric arrays up to this length are decoded (per-layer values)
MAX_KEPT_VALUES = 1 << 16  # numeric array values decoded, in all


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
_TYPES = tuple(ValueType)
_SIZES = tuple(struct.calcsize("<" + _SCALARS[t]) if t in _SCALARS else 0 for t in _TYPES)  # 0: walked
_STRING = int(ValueType.STRING)


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """An array value: its element type and length; `values` only for short numeric arrays."""

    element_type: ValueType
    count: int
    values: tuple[int | float | bool, ...] | None = None


@dataclass(frozen=True, slots=True)
class StringInfo:
    """A string value too long to keep (over `KEEP_STRING_BYTES`, or past the decoding budget)."""

    length: int


Scalar = Union[int, float, bool, str]
Value = Union[Scalar, ArrayInfo, StringInfo]


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
    """Internal: abandons the parse. Carries the problem and, added while it propagates,
    where it happened; the message is built once, at the boundary."""

    def __init__(self, problem: str, truncated: bool = False, needed: int | None = None) -> None:
        self.problem = problem
        self.truncated = truncated
        self.needed = needed
        self.where: list[str] = []

    def inside(self, place: str) -> "_Stop":
        self.where.append(place)
        return self

    def error(self) -> GGUFError:
        where = " of ".join(self.where)
        return GGUFError(f"{where}: {self.problem}" if where else self.problem, self.truncated, self.needed)


def _short(key: str, limit: int = 80) -> str:
    """The key for a message: its repr, cut to `limit` characters (a key may be 64 KiB of escapes)."""
    shown = repr(key[:limit])
    return shown if len(key) <= limit and len(shown) <= limit else shown[:limit] + "…"


def _corrupt(what: str) -> _Stop:
    return _Stop(f"{what}; the file is corrupt")


class _Reader:
    """A cursor over a window of the file, with the budgets of one parse.

    `buf` holds the file's bytes from offset `base`; `pos` is relative to it.
    What is skipped (fixed-size arrays, strings inside arrays, long strings)
    is stepped over without being read: `pos` may run past the window, and
    the next `need` fetches a new window from there. So the bytes read are
    the bytes looked at, and memory is one window, not the whole header.
    Without `fetch` the window is the whole input (`parse_header`).
    """

    def __init__(self, data: bytes, order: str, fetch: Callable[[int, int], bytes] | None = None,
                 size: int | None = None, limit: int | None = None, window: int = 0) -> None:
        self.buf = memoryview(data)
        self.base = 0
        self.pos = 0
        self.order = order  # struct prefix "<" or ">"
        self.fetch = fetch
        self.size = len(data) if size is None else size  # the file's length
        self.limit = limit  # the metadata must end by this offset (None: no limit)
        self.window = window
        self.u32 = struct.Struct(order + "I").unpack_from
        self.u64 = struct.Struct(order + "Q").unpack_from
        self.head = struct.Struct(order + "IQ").unpack_from
        self.work = MAX_WORK
        self.nested = MAX_NESTED_ARRAYS
        self.decoded = MAX_DECODED_BYTES
        self.kept = MAX_KEPT_VALUES

    # -- bytes -----------------------------------------------------------------------

    def need(self, n: int) -> None:
        """Make `buf[pos:pos + n]` available, moving the window (and `pos`) if there is a
        source; else stop, saying how far the input would have to reach."""
        if self.pos + n <= len(self.buf):
            return
        start = self.base + self.pos
        end = start + n
        self.beyond(end)
        if self.fetch is None or end > self.size:
            raise _Stop(f"input ends inside the header (at byte {min(self.base + len(self.buf), self.size)}, "
                        f"{end} needed)", truncated=True, needed=end)
        chunk = self.fetch(start, min(self.size - start, max(n, self.window)))
        if len(chunk) < n:  # the file is shorter than it was when its size was taken
            raise _Stop(f"input ends inside the header (at byte {start + len(chunk)}, {end} needed)",
                        truncated=True, needed=end)
        self.buf.release()
        self.buf, self.base, self.pos = memoryview(chunk), start, 0

    def beyond(self, end: int) -> None:
        if self.limit is not None and end > self.limit:
            raise _Stop(f"the GGUF metadata is larger than {self.limit >> 20} MiB; not reading further")

    def charge(self, units: int, what: str) -> None:
        self.work -= units
        if self.work < 0:
            raise _Stop(f"{what} takes the header past {MAX_WORK:,} walked items, far more than any real "
                        "model's; not reading it")

    def read_u32(self) -> int:
        self.need(4)
        value = self.u32(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def read_u64(self) -> int:
        self.need(8)
        value = self.u64(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def text(self, length: int) -> str:
        self.need(length)
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        self.decoded -= length
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return str(raw, "utf-8", "replace")
        finally:
            raw.release()

    def skip(self, n: int) -> None:
        """Step over `n` bytes unread; `end` checks that they were there."""
        self.pos += n
        self.beyond(self.base + self.pos)

    def end(self) -> int:
        """The metadata ends here: the file must reach this far."""
        end = self.base + self.pos
        self.beyond(end)
        if end > self.size or (self.fetch is None and end > self.base + len(self.buf)):
            raise _Stop(f"input ends inside the header ({end} bytes needed)", truncated=True, needed=end)
        return end

    # -- values ----------------------------------------------------------------------

    def key(self) -> str:
        length = self.read_u64()
        if length > MAX_KEY_BYTES:
            raise _corrupt(f"its name claims {length} bytes, which is not plausible")
        if length > self.decoded:
            raise _Stop(f"the metadata names take more than {MAX_DECODED_BYTES >> 20} MiB, far more than any "
                        "real model's; not reading them")
        return self.text(length)

    def value_type(self) -> ValueType:
        code = self.read_u32()
        if code >= len(_TYPES):
            raise _corrupt(f"unknown value type {code}")
        return _TYPES[code]

    def value(self, vtype: ValueType) -> Value:
        if vtype is ValueType.STRING:
            length = self.read_u64()
            if length > MAX_STRING_BYTES:
                raise _corrupt(f"the string claims {length} bytes, which is not plausible")
            if length > KEEP_STRING_BYTES or length > self.decoded:
                self.skip(length)
                return StringInfo(length)
            return self.text(length)
        if vtype is ValueType.ARRAY:
            return self.array(0)
        fmt = self.order + _SCALARS[vtype]
        size = _SIZES[vtype]
        self.need(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def array(self, depth: int) -> ArrayInfo:
        """A metadata value of type array: its element type, length and (short numeric) values."""
        code, count = self.array_head(depth)
        etype = _TYPES[code]
        size = _SIZES[code]
        if size:
            values = None
            if count <= KEEP_ARRAY_VALUES and count <= self.kept:
                self.kept -= count
                self.need(count * size)
                values = struct.unpack_from(f"{self.order}{count}{_SCALARS[etype]}", self.buf, self.pos)
            self.skip(count * size)
            return ArrayInfo(etype, count, values)
        self.walk(code, count, depth)
        return ArrayInfo(etype, count)

    def array_head(self, depth: int) -> tuple[int, int]:
        """(element type code, count) of the array at the cursor, checked."""
        if depth >= MAX_ARRAY_DEPTH:
            raise _corrupt(f"arrays nest deeper than {MAX_ARRAY_DEPTH}")
        if self.pos + 12 > len(self.buf):
            self.need(12)
        code, count = self.head(self.buf, self.pos)
        self.pos += 12
        if code >= len(_TYPES):
            raise _corrupt(f"the array's elements have unknown value type {code}")
        if count > MAX_ARRAY_COUNT:
            raise _corrupt(f"the array claims {count} elements, which is not plausible")
        return code, count

    def walk(self, code: int, count: int, depth: int) -> None:
        """Skip `count` strings or arrays (elements of an array at `depth`), within the budgets."""
        if code == _STRING:
            self.charge(count, f"an array of {count:,} strings")
            self.skip_strings(count)
            return
        self.nested -= count
        if self.nested < 0:
            raise _Stop(f"an array of {count:,} arrays takes the header past {MAX_NESTED_ARRAYS:,} arrays inside "
                        "arrays (llama.cpp loads none); not reading it")
        sizes, i = _SIZES, 0
        try:
            for i in range(count):  # the arrays inside: kept tight, nothing is built per element
                code_i, count_i = self.array_head(depth + 1)
                size = sizes[code_i]
                if size:
                    self.pos += count_i * size  # skipped unread; the next need or `end` checks it
                else:
                    self.walk(code_i, count_i, depth + 1)
        except _Stop as stop:
            raise stop.inside(f"element {i}") from None

    def skip_strings(self, count: int) -> None:
        """Walk `count` length-prefixed strings: the hot loop of big vocabularies.

        No bounds test per element: `unpack_from` raises at the window's end,
        and then the window moves (or the parse stops) and the walk resumes."""
        length_at = self.u64
        left = count
        while left:
            buf, pos, i = self.buf, self.pos, 0
            try:
                for i in range(left):
                    pos += length_at(buf, pos)[0] + 8
            except (struct.error, OverflowError):  # past the window; OverflowError: past 2**63
                left -= i
                at = count - left
                if i and pos > len(buf) + MAX_STRING_BYTES + 8:  # the last length was read inside the window
                    raise _corrupt(f"the string claims more than {MAX_STRING_BYTES >> 20} MiB, which is not "
                                   "plausible").inside(f"element {at - 1}") from None
                self.pos = pos
                try:
                    self.need(8)
                except _Stop as stop:
                    raise stop.inside(f"element {at}") from None
                continue
            self.pos = pos
            left = 0
        self.beyond(self.base + self.pos)


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


def _parse(data: bytes, fetch: Callable[[int, int], bytes] | None = None, size: int | None = None,
           limit: int | None = None, window: int = 0) -> GGUFHeader | GGUFError:
    order = _byte_order(data)
    if isinstance(order, GGUFError):
        return order
    prefix, version = order
    reader = _Reader(data, prefix, fetch, size, limit, window)
    reader.pos = 8
    try:
        try:
            tensor_count = reader.read_u64()
            kv_count = reader.read_u64()
        except _Stop as stop:
            raise stop.inside("the GGUF preamble") from None
        if tensor_count > MAX_TENSOR_COUNT:
            return GGUFError(f"header claims {tensor_count} tensors, which is not plausible; the file is corrupt")
        if kv_count > MAX_KV_COUNT:
            return GGUFError(f"header claims {kv_count} metadata keys, which is not plausible (at most "
                             f"{MAX_KV_COUNT:,}); the file is corrupt")
        reader.charge(kv_count * KEY_COST, f"{kv_count:,} metadata keys")
        metadata: dict[str, Value] = {}
        i, key = 0, None
        try:
            for i in range(kv_count):
                key = None
                key = reader.key()
                metadata[key] = reader.value(reader.value_type())
        except _Stop as stop:
            raise stop.inside(f"metadata key {_short(key)}" if key is not None else f"metadata key {i}") from None
        end = reader.end()
    except _Stop as stop:
        return stop.error()
    finally:
        reader.buf.release()
    return GGUFHeader(version=version, byte_order="little" if prefix == "<" else "big",
                      tensor_count=tensor_count, metadata=metadata, size=end)


def parse_header(data: bytes | bytearray | memoryview) -> GGUFHeader | GGUFError:
    """Parse the header and every metadata key from a prefix of a GGUF file.

    Give at least the whole metadata section; if the prefix is too short the
    result is a `GGUFError` with `truncated=True` and a `needed` hint.
    Duplicate keys keep the last value, as llama.cpp does.
    """
    return _parse(bytes(data))


def read_header_from(read: Callable[[int, int], bytes], size: int, first: int, limit: int) -> GGUFHeader | GGUFError:
    """Parse the header of a file of `size` bytes, fetching it with `read(offset, length)`
    in windows of `first` bytes (or what one value needs), the metadata ending by `limit`.

    One pass, and only what is looked at is read: fixed-size arrays and the
    text of strings inside arrays are stepped over. `read` may raise OSError;
    that propagates to the caller, who knows the file. A short read is the
    end of the file.
    """
    return _parse(read(0, min(first, size)), read, size, limit, first)
