"""`Model.spec.files` and `Model.spec.mmproj`: a Model made of several files (pure).

Why its own module: LLMKube lets `source` name a repository, bucket prefix or
directory and `files` list what to stage from it. `files[0]` is the file
handed to the engine (for a split GGUF its first part, `-00001-of-0000N.gguf`;
llama-server finds the other parts beside it by name), and `mmproj` is a
vision projector passed as `--mmproj`. Every file lands at `<base>/<path>`,
as LLMKube stages them, so one base directory locates them all.

These names come from a stranger's spec and become URLs and cache paths, so
they are checked here before anything else sees them: relative, no `..`, no
glob (LLMKube accepts globs only against a repository listing, which a Mac
does not fetch), segments of plain characters, a bounded count and length,
no file named twice. A split primary must list every part: llama-server
would otherwise fail at load time, long after the downloads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from metal_agent.core.api import ModelFormat, ModelSource, ModelSpec, SourceKind
from metal_agent.core.spec_reader import Reader
from metal_agent.core.status import Blocker

MAX_FILES = 64
#: What the model store keeps beside a file (adapters.model_cache.CachePaths).
STORE_SUFFIXES = (".partial", ".partial.json", ".sha256.json")
MAX_PATH = 512
_SEGMENT = re.compile(r"[A-Za-z0-9_+@-][A-Za-z0-9._+@-]{0,199}")
_SPLIT = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def _check_path(r: Reader, value: str, where: str) -> bool:
    if len(value) > MAX_PATH:
        r.error(where, f"must be at most {MAX_PATH} characters")
        return False
    parts = value.split("/")
    if value.startswith("/") or any(not _SEGMENT.fullmatch(p) for p in parts):
        r.error(where, f"{value!r} must be a relative path of names made of letters, digits and . _ + @ - "
                "(no leading '/', no '..', no glob, no empty segment)")
        return False
    if value.endswith(STORE_SUFFIXES):
        # Beside each file the store keeps its partial download and its verification record; a
        # file of the set named like one would overwrite another's.
        r.error(where, f"{value!r} ends like a file of the model store ({', '.join(STORE_SUFFIXES)})")
        return False
    return True


def split_parts(name: str) -> tuple[str, ...]:
    """Every part's path of the split GGUF whose first part is `name` (() when it is not one)."""
    match = _SPLIT.fullmatch(name)
    if match is None or int(match["no"]) != 1:
        return ()
    count = int(match["count"])
    return tuple(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1))


def read_files(r: Reader, spec: Mapping[str, Any] | None, fmt: ModelFormat | None) -> tuple[tuple[str, ...], str | None]:
    """`spec.files` and `spec.mmproj`, checked (errors go to `r`)."""
    files = r.string_list(spec, "files", "spec.files")
    mmproj = r.string(spec, "mmproj", "spec.mmproj", allow_newlines=False) or None
    if not files and mmproj is None:
        return (), None
    if fmt is ModelFormat.MLX:
        r.error("spec.files", "MLX models are fetched as a whole repository (the source); files and mmproj "
                "are for GGUF models")
        return (), None
    if not files:
        r.error("spec.files", "must name the primary model file when spec.mmproj is set (as LLMKube requires)")
        return (), None
    if len(files) > MAX_FILES:
        r.error("spec.files", f"at most {MAX_FILES} files")
        return (), None
    ok = all([_check_path(r, f, f"spec.files[{i}]") for i, f in enumerate(files)])
    ok = (mmproj is None or _check_path(r, mmproj, "spec.mmproj")) and ok
    if not ok:
        return (), None
    unique = tuple(dict.fromkeys(files))
    missing = [p for p in split_parts(files[0]) if p not in unique]
    if missing:
        r.error("spec.files", f"{files[0]!r} is the first part of a split GGUF; list every part "
                f"(missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})")
        return (), None
    return unique, mmproj


def companions(spec: ModelSpec) -> tuple[str, ...]:
    """The files besides the primary one, mmproj included, each once."""
    rest = [*spec.files[1:], *([spec.mmproj] if spec.mmproj else [])]
    return tuple(p for p in dict.fromkeys(rest) if p != (spec.files[0] if spec.files else None))


def base_of(spec: ModelSpec, primary_path: str) -> str:
    """The directory every file of the set lives under, from where the primary file is."""
    depth = len(spec.files[0].split("/"))
    return str(PurePosixPath(primary_path).parents[depth - 1])


def path_of(spec: ModelSpec, primary_path: str, name: str) -> str:
    return str(PurePosixPath(base_of(spec, primary_path), name))


def mmproj_path(spec: ModelSpec, primary_path: str) -> str | None:
    """Where the vision projector is, given where the primary file is (None: the Model has none)."""
    return path_of(spec, primary_path, spec.mmproj) if spec.mmproj and spec.files else None


def file_url(source: ModelSource, name: str, hf_endpoint: str) -> str | Blocker:
    """The URL of file `name` of a set whose `source` is a repository (`hf://org/repo[@rev][/dir]`)
    or an http(s) prefix (`https://host/dir`)."""
    rel = quote(name, safe="/@+")
    if source.kind is SourceKind.HTTP:
        base = source.raw.split("?", 1)[0].split("#", 1)[0].rstrip("/")
        return f"{base}/{rel}"
    if source.kind is not SourceKind.HUGGINGFACE:
        return Blocker("ModelSourceUnsupported", f"{source.kind.value} sources are not downloaded")
    rest = source.raw.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        return Blocker("ModelSourceInvalid", f"source {source.raw!r}: with spec.files, name a repository as "
                       "hf://org/repo[@revision]")
    org, repo, below = parts[0], parts[1], parts[2:]
    revision = "main"
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not repo or not revision:
            return Blocker("ModelSourceInvalid", f"source {source.raw!r}: write a revision as hf://org/repo@revision")
    path = "/".join([*below, rel])
    return f"{hf_endpoint.rstrip('/')}/{org}/{repo}/resolve/{quote(revision, safe='%')}/{path}"


def set_key(source: ModelSource, hf_endpoint: str) -> str:
    """What names the set in the cache: the URL of its base (one directory per repository)."""
    url = file_url(source, "", hf_endpoint)
    return url if isinstance(url, str) else source.raw
