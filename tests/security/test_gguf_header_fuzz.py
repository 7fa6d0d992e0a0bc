"""Property tests of the GGUF header parser against the bytes a stranger can put in a model file.

A Model's source is written by anyone with edit rights in some namespace,
and the agent parses its header on the way to admission. Whatever the bytes,
the parser must answer with a `GGUFHeader` or a `GGUFError` (never raise),
quickly (a bound on process CPU per example), and the same whether it sees
the whole prefix or reads the file in windows. Honest files, written by
llama.cpp's own `gguf` package or the real tiny model the suite serves, must
read exactly as the reference reader reads them.

Hypothesis runs derandomized (a fixed sequence of examples, no example
database), with a deadline, so the suite cannot flake on a lucky draw.
"""

from __future__ import annotations

import struct
import time
from datetime import timedelta
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from metal_agent.core.gguf_header import ArrayInfo, GGUFError, GGUFHeader, StringInfo, parse_header, read_header_from  # noqa: E402
from tests.support import gguf_forge as f  # noqa: E402

LIMIT = 128 << 20  # the agent's HEADER_MAX_READ
CPU_BOUND = 1.0  # seconds of process CPU per example; examples are KBs, so this is generous
FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def answered(data: bytes, first: int, tail: int) -> GGUFHeader | GGUFError:
    """Parse `data` (+ `tail` zeros) whole and in windows of `first`: same answer, within the bound."""
    file = data + bytes(tail)
    started = time.process_time()
    whole = parse_header(file)
    windowed = read_header_from(lambda offset, length: file[offset:offset + length], len(file), first, LIMIT)
    spent = time.process_time() - started
    assert isinstance(whole, (GGUFHeader, GGUFError)), whole
    assert spent < CPU_BOUND, spent
    if isinstance(whole, GGUFError) and whole.truncated:  # the file ends early: or, read from disk, past the limit
        assert isinstance(windowed, GGUFError), windowed
        assert windowed.truncated or (whole.needed > LIMIT and "larger than 128 MiB" in windowed.message), windowed
    else:
        assert windowed == whole
    return whole


# -- arbitrary bytes -------------------------------------------------------------------------------

@FUZZ
@given(body=st.binary(max_size=2048), version=st.sampled_from([2, 3, 1, 4]), counts=st.tuples(
    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), magic=st.booleans(), first=st.integers(24, 4096),
    tail=st.integers(0, 1024))
def test_arbitrary_bytes_are_answered(body, version, counts, magic, first, tail):
    head = (b"GGUF" if magic else b"GGUG") + struct.pack("<IQQ", version, *counts)
    answered(head + body, first, tail)


# -- structured hostile headers ----------------------------------------------------------------------

TYPES = list(range(13))
_key = st.one_of(st.binary(max_size=40), st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 70_000),
                                                    st.integers(0, 255)))
_count = st.one_of(st.integers(0, 40), st.sampled_from([2**16, 2**24, 2**24 + 1, 2**32, 2**63 - 9, 2**63, 2**64 - 1]))


@st.composite
def values(draw, depth: int = 0) -> tuple[int, bytes]:
    """(value type, value bytes), sometimes lying about a length or a type."""
    vtype = draw(st.sampled_from(TYPES if depth < 5 else TYPES[:9]))
    if vtype == f.STRING:
        raw = draw(st.binary(max_size=64))
        length = draw(st.one_of(st.just(len(raw)), _count))
        return vtype, struct.pack("<Q", length) + raw
    if vtype == f.ARRAY:
        etype = draw(st.sampled_from(TYPES + [13, 2**32 - 1]))
        n = draw(st.integers(0, 6))
        parts = []
        for _ in range(n):
            if etype == f.ARRAY:
                parts.append(draw(values(depth + 1).filter(lambda v: v[0] == f.ARRAY))[1])
            elif etype == f.STRING:
                raw = draw(st.binary(max_size=16))
                parts.append(struct.pack("<Q", draw(st.one_of(st.just(len(raw)), _count))) + raw)
            elif etype in f._FORMATS:
                parts.append(bytes(struct.calcsize("<" + f._FORMATS[etype])))
        count = draw(st.one_of(st.just(n), _count))
        return vtype, f.array_head(etype, count) + b"".join(parts)
    return vtype, bytes(struct.calcsize("<" + f._FORMATS[vtype]))


@st.composite
def hostile_headers(draw) -> bytes:
    entries = []
    for _ in range(draw(st.integers(0, 6))):
        vtype, payload = draw(values())
        vtype = draw(st.one_of(st.just(vtype), st.integers(0, 2**32 - 1))) if draw(st.booleans()) else vtype
        entries.append(f.kv(draw(_key), vtype, payload))
    data = f.preamble(draw(st.one_of(st.just(len(entries)), _count)), draw(st.sampled_from([0, 1, 2**40])),
                      order=draw(st.sampled_from(["<", ">"]))) + b"".join(entries)
    cut = draw(st.integers(0, len(data)))
    return data[:cut] if draw(st.booleans()) else data


@FUZZ
@given(data=hostile_headers(), first=st.integers(24, 4096), tail=st.integers(0, 256))
def test_structured_hostile_headers_are_answered(data, first, tail):
    answered(data, first, tail)


HONEST = f.header([*f.llama_header(), f.kv("tokenizer.ggml.tokens", f.ARRAY, f.array_head(f.STRING, 40)
                                                                  + b"".join(f.string(f"t{i}") for i in range(40))),
                   f.kv("per_layer", f.ARRAY, f.array_head(f.U32, 2) + b"\x02\0\0\0\x01\0\0\0"),
                   f.kv("chat", f.STRING, f.string("{{ m }}"))])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(HONEST) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       first=st.integers(24, 512), tail=st.integers(0, 256))
def test_an_honest_header_with_bytes_changed_is_answered(flips, first, tail):
    data = bytearray(HONEST)
    for at, byte in flips:
        data[at] = byte
    answered(bytes(data), first, tail)


@settings(max_examples=12, deadline=timedelta(seconds=20), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shape=st.sampled_from(sorted(f.SHAPES)), size=st.sampled_from([64 * 1024, 1 << 20, 4 << 20]))
def test_named_worst_shapes_are_answered(shape, size):
    answered(f.SHAPES[shape](size), 8 << 20, 4096)


# -- honest files read as the reference reads them ------------------------------------------------------

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")


def same_as_reference(path: Path) -> GGUFHeader:
    """Our header of `path` equals gguf.GGUFReader's reading, key by key."""
    ours = parse_header(path.read_bytes())
    assert isinstance(ours, GGUFHeader), ours
    reader = gguf.GGUFReader(str(path))
    theirs = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(theirs)
    for key, field in theirs.items():
        value = ours.metadata[key]
        if isinstance(value, ArrayInfo):
            assert field.types[0] == gguf.GGUFValueType.ARRAY and value.count == len(field.data), key
            if value.values is not None:
                assert list(value.values) == pytest.approx(field.contents()), key
        elif isinstance(value, StringInfo):
            assert value.length == len(field.contents().encode())
        else:
            assert value == pytest.approx(field.contents()) if isinstance(value, float) else value == field.contents(), key
    return ours


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_metadata = st.dictionaries(
    st.from_regex(r"[a-z]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True).filter(lambda k: not k.startswith("general")),
    st.one_of(st.integers(0, 2**31 - 1), _text, st.booleans(),
              st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=50),
              st.lists(_text, min_size=1, max_size=50)),
    max_size=12)


@settings(max_examples=25, deadline=timedelta(seconds=10), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(metadata=_metadata)
def test_headers_written_by_gguf_read_as_the_reference_reads_them(tmp_path, metadata):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    w.add_tensor("w", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = same_as_reference(path)
    assert answered(path.read_bytes(), 64, 0) == header


def test_the_real_tiny_model_and_its_vocabulary_read_as_the_reference_reads_them(tiny_model, llama_vocab):
    """The tiny model against gguf.GGUFReader (which takes ~9 s over its 32k-token vocabulary;
    ours ~50 ms); llama.cpp's vocabulary file, whose keys the tiny model copies, alike."""
    model = same_as_reference(tiny_model)
    vocab = parse_header(llama_vocab.read_bytes())
    assert isinstance(vocab, GGUFHeader)
    for header, path in ((model, tiny_model), (vocab, llama_vocab)):
        assert header.metadata["tokenizer.ggml.tokens"] == ArrayInfo(f.STRING, 32_000)
        assert answered(path.read_bytes()[:header.size + 4096], 4096, 0) == header
    assert {k: v for k, v in vocab.metadata.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in model.metadata.items() if k.startswith("tokenizer.")}
