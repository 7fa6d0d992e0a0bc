"""`Model.spec.files` / `spec.mmproj`: what a stranger may name, where each file comes from and lands,
`--mmproj`, the spec hash and memory admission counting every file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from metal_agent.adapters.model_files import ModelFiles
from metal_agent.adapters.model_sets import members, present_set, with_companions
from metal_agent.core.api import ModelSource, SourceKind
from metal_agent.core.argv import build_argv
from metal_agent.core.launch import Instance
from metal_agent.core.companion_files import file_url, mmproj_path, split_parts
from metal_agent.core.memory import EstimateFailed, MemoryEstimate
from metal_agent.core.model_validation import parse_model
from metal_agent.core.result import Parsed
from metal_agent.core.spec_hash import spec_hash
from tests.support.manifests import model_doc, workload
from tests.unit.test_argv import OPTIONS, has_run

SPLIT = ["Q4/m-00001-of-00003.gguf", "Q4/m-00002-of-00003.gguf", "Q4/m-00003-of-00003.gguf"]
REPO = "hf://org/Repo-GGUF"


def parse(**spec):
    return parse_model(model_doc(**spec))


def errors(**spec) -> dict[str, str]:
    outcome = parse(**spec)
    assert not isinstance(outcome, Parsed), "expected a refusal"
    return {e.path: e.message for e in outcome.errors}


def test_a_split_set_with_a_projector_is_accepted():
    outcome = parse(source=REPO, files=SPLIT, mmproj="mmproj-F16.gguf")
    assert isinstance(outcome, Parsed), outcome
    assert outcome.value.spec.files == tuple(SPLIT) and outcome.value.spec.mmproj == "mmproj-F16.gguf"


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"files": ["../etc/passwd"]}, "spec.files[0]", "relative path"),
        ({"files": ["/etc/passwd"]}, "spec.files[0]", "relative path"),
        ({"files": ["a/../../b.gguf"]}, "spec.files[0]", "relative path"),
        ({"files": ["*.gguf"]}, "spec.files[0]", "no glob"),
        ({"files": ["a//b.gguf"]}, "spec.files[0]", "no empty segment"),
        ({"files": [".hidden"]}, "spec.files[0]", "relative path"),
        ({"files": ["m.gguf", "x\\y.gguf"]}, "spec.files[1]", "relative path"),
        ({"files": ["a" * 600]}, "spec.files[0]", "at most 512"),
        ({"files": [f"f{i}.gguf" for i in range(65)]}, "spec.files", "at most 64"),
        ({"mmproj": "mmproj.gguf"}, "spec.files", "primary model file"),
        ({"files": ["m.gguf"], "mmproj": "../mm.gguf"}, "spec.mmproj", "relative path"),
        ({"files": SPLIT[:2]}, "spec.files", "missing Q4/m-00003-of-00003.gguf"),
        ({"files": ["m.gguf"], "format": "mlx"}, "spec.files", "MLX models"),
        ({"files": ["m.gguf", "m.gguf.sha256.json"]}, "spec.files[1]", "model store"),
        ({"files": ["m.gguf"], "mmproj": "m.gguf.partial"}, "spec.mmproj", "model store"),
    ],
)
def test_names_a_stranger_may_not_give(spec, path, words):
    spec.setdefault("source", REPO)
    got = errors(**spec)
    assert path in got and words in got[path], got


def test_the_store_suffixes_are_the_caches_own():
    from metal_agent.adapters.model_cache import CachePaths
    from metal_agent.core.companion_files import STORE_SUFFIXES

    paths = CachePaths(Path("/c/m.gguf"))
    assert {p.name.removeprefix("m.gguf") for p in (paths.partial, paths.partial_meta, paths.sidecar)} == set(STORE_SUFFIXES)


def test_split_parts_follow_llamas_naming():
    assert split_parts("m-00001-of-00002.gguf") == ("m-00001-of-00002.gguf", "m-00002-of-00002.gguf")
    assert split_parts("m-00002-of-00002.gguf") == ()  # only a first part names the set
    assert split_parts("m.gguf") == ()


@pytest.mark.parametrize(
    ("source", "url"),
    [
        ("hf://org/Repo-GGUF", "https://huggingface.co/org/Repo-GGUF/resolve/main/Q4/m 1.gguf"),
        ("hf://org/Repo-GGUF@v1", "https://huggingface.co/org/Repo-GGUF/resolve/v1/Q4/m 1.gguf"),
        ("hf://org/Repo-GGUF/sub", "https://huggingface.co/org/Repo-GGUF/resolve/main/sub/Q4/m 1.gguf"),
        ("https://host/models/", "https://host/models/Q4/m 1.gguf"),
        ("https://host/models?sig=secret", "https://host/models/Q4/m 1.gguf"),
    ],
)
def test_each_file_comes_from_below_the_source(source, url):
    kind = SourceKind.HUGGINGFACE if source.startswith("hf") else SourceKind.HTTP
    assert file_url(ModelSource(source, kind), "Q4/m 1.gguf", "https://huggingface.co") == url.replace(" ", "%20")


def test_mmproj_is_passed_from_beside_the_primary_file():
    wl = workload(source=REPO, files=SPLIT, mmproj="proj/mmproj-F16.gguf")
    settings, _ = OPTIONS
    argv = build_argv(wl, settings, Instance("/cache/abc/Q4/m-00001-of-00003.gguf", 18080))
    assert has_run(argv, ["--model", "/cache/abc/Q4/m-00001-of-00003.gguf"])
    assert has_run(argv, ["--mmproj", "/cache/abc/proj/mmproj-F16.gguf"])
    assert mmproj_path(wl.model.spec, "/cache/abc/Q4/m-00001-of-00003.gguf") == "/cache/abc/proj/mmproj-F16.gguf"
    assert "--mmproj" not in build_argv(workload(source=REPO, files=SPLIT), settings, Instance("/c/m.gguf", 1))


def test_files_and_projector_are_part_of_the_spec_hash():
    plain = spec_hash(workload())
    assert spec_hash(workload(source=REPO, files=SPLIT)) != spec_hash(workload(source=REPO, files=SPLIT[:1] + SPLIT[1:][::-1]))
    with_proj = spec_hash(workload(source=REPO, files=SPLIT, mmproj="mm.gguf"))
    assert with_proj != spec_hash(workload(source=REPO, files=SPLIT))
    assert plain == spec_hash(workload())  # a Model without files keeps its digest


def test_a_set_lands_in_one_directory_keyed_by_its_base(tmp_path: Path):
    store = ModelFiles(tmp_path / "cache")
    try:
        model = workload(source=REPO, files=SPLIT, mmproj="mm.gguf", sha256="a" * 64).model
        found = members(store, model)
        finals = [paths.final for _, _, paths, _ in found]
        base = finals[-1].parent  # where mm.gguf (no directory of its own) lands
        assert base.parent == tmp_path / "cache"
        assert [str(p.relative_to(base)) for p in finals] == [*SPLIT, "mm.gguf"]
        assert [expected for *_, expected in found] == ["a" * 64, None, None, None]  # sha256 is the model file's
        assert present_set(store, model) is None
        for p in finals:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
        assert present_set(store, model) == finals[0]
    finally:
        store.estimates.close()


def test_memory_counts_every_file_of_the_set(tmp_path: Path):
    spec = workload(source=REPO, files=SPLIT, mmproj="mm.gguf").model.spec
    for name, size in [(SPLIT[1], 3000), (SPLIT[2], 2000), ("mm.gguf", 700)]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\0" * size)
    estimate = MemoryEstimate(weights_bytes=1000, kv_bytes=10, overhead_bytes=1, context=8, cache_type_k="f16",
                              cache_type_v="f16")
    got = asyncio.run(with_companions(estimate, spec, tmp_path / SPLIT[0]))
    assert got.weights_bytes == 1000 + 3000 + 2000 + 700
    assert "3 more file(s) of spec.files" in got.notes[-1]
    (tmp_path / "mm.gguf").unlink()
    missing = asyncio.run(with_companions(estimate, spec, tmp_path / SPLIT[0]))
    assert isinstance(missing, EstimateFailed)
