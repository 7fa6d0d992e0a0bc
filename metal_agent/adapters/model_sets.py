"""A Model made of several files (`spec.files`, `spec.mmproj`), found or fetched as one.

Why: a split GGUF is useless until every part is on disk, and llama-server
finds the parts beside the first by name, so the store keeps a set's files
together: fetched from `<source>/<name>` into `<cache>/<sha256(base)[:16]>/<name>`
(one directory per repository or prefix, as LLMKube stages them under one
base), or used in place under a local directory source. Each file is fetched
by the same downloader as a one-file Model (egress allowlist, size and disk
limits, resume, the token only to hosts that may have it), one after another
so a 64-file set opens one connection at a time; `spec.sha256` verifies
`files[0]`, as it names "the model file". The answer is ready only when all
files are.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from metal_agent.adapters.local_models import check_local_file
from metal_agent.adapters.model_cache import CachePaths
from metal_agent.adapters.model_lookup import Lookup, ModelPending, ModelReady
from metal_agent.core.api import Model, ModelSpec, SecretRef, SourceKind
from metal_agent.core.companion_files import companions, file_url, path_of, set_key
from metal_agent.core.memory import EstimateFailed, MemoryEstimate, gib
from metal_agent.core.status import Blocker

if TYPE_CHECKING:
    from metal_agent.adapters.model_files import ModelFiles

# (file name in the set, its URL, where it is cached, the sha256 it must have)
Member = tuple[str, str, CachePaths, str | None]


def names(model: Model) -> tuple[str, ...]:
    spec = model.spec
    return tuple(dict.fromkeys([*spec.files, *([spec.mmproj] if spec.mmproj else [])]))


def members(store: ModelFiles, model: Model) -> list[Member] | Blocker:
    """Every file of a downloaded set, or why the set cannot be downloaded."""
    source = model.spec.source
    if source.kind not in (SourceKind.HTTP, SourceKind.HUGGINGFACE):
        return Blocker("ModelSourceUnsupported",
                       f"{source.kind.value}:// sources are not available on a Mac; use an https://, hf:// or "
                       "file:// source (a repository, prefix or directory holding spec.files)")
    directory = store.cache_dir / hashlib.sha256(set_key(source, store.hf_endpoint).encode()).hexdigest()[:16]
    found: list[Member] = []
    for name in names(model):
        url = file_url(source, name, store.hf_endpoint)
        if isinstance(url, Blocker):
            return url
        expected = model.spec.sha256 if name == model.spec.files[0] else None
        found.append((name, url, CachePaths(directory / name), expected))
    return found


def _local(model: Model) -> Lookup:
    base = Path(model.spec.source.local_path)
    for name in names(model):
        blocker = check_local_file(base / name)
        if blocker is not None:
            return replace(blocker, message=f"{name} of spec.files: {blocker.message}")
    return ModelReady(base / model.spec.files[0])


def lookup_set(store: ModelFiles, model: Model, key: str | None, secret_ref: SecretRef | None) -> Lookup:
    """Ready (the first file's path) when every file is; else the first file not ready yet, whose
    download this starts (or joins), or why it cannot be had."""
    if model.spec.source.kind in (SourceKind.FILE, SourceKind.PATH):
        if key is not None:
            store._wait_on(key, set())
        return _local(model)
    found = members(store, model)
    if isinstance(found, Blocker):
        if key is not None:
            store._wait_on(key, set())
        return found
    if key is not None:
        store._wait_on(key, {paths.final for _, _, paths, _ in found})
    ready_path: ModelReady | None = None
    for index, (name, url, paths, expected) in enumerate(found):
        answer = store._lookup_download(model, key, url, paths, secret_ref, expected, wait=False)
        where = f"file {index + 1} of {len(found)} ({name})"
        if isinstance(answer, ModelPending):
            return ModelPending(f"{where}: {answer.message}")
        if isinstance(answer, Blocker):
            return replace(answer, message=f"{where}: {answer.message}")
        if index == 0:
            ready_path = answer
    return ready_path if ready_path is not None else Blocker("ModelSourceInvalid", "spec.files is empty")


def present_set(store: ModelFiles, model: Model) -> Path | None:
    """The first file's path if every file of the set is on disk now (nothing started)."""
    if model.spec.source.kind in (SourceKind.FILE, SourceKind.PATH):
        ready = _local(model)
        return ready.path if isinstance(ready, ModelReady) else None
    found = members(store, model)
    if isinstance(found, Blocker) or not all(paths.final.is_file() for _, _, paths, _ in found):
        return None
    return found[0][2].final


def set_failure_keys(store: ModelFiles, model: Model) -> list[tuple[Path, str | None]]:
    """The keys under which the store remembers failed downloads of the set's files."""
    if not model.spec.files:
        return []
    found = members(store, model)
    return [] if isinstance(found, Blocker) else [(paths.final, expected) for _, _, paths, expected in found]


async def with_companions(estimate: MemoryEstimate | EstimateFailed, spec: ModelSpec,
                          primary: Path) -> MemoryEstimate | EstimateFailed:
    """`estimate` (made from the first file) plus the bytes of the set's other files: a split GGUF's
    other parts are weights too, and llama-server loads the vision projector into memory."""
    others = companions(spec)
    if isinstance(estimate, EstimateFailed) or not others:
        return estimate

    def sizes() -> int:
        return sum(Path(path_of(spec, str(primary), name)).stat().st_size for name in others)

    try:
        extra = await asyncio.to_thread(sizes)
    except OSError as err:
        return EstimateFailed(f"a file of spec.files: {err.strerror or err}")
    return replace(estimate, weights_bytes=estimate.weights_bytes + extra,
                   notes=(*estimate.notes, f"includes {len(others)} more file(s) of spec.files ({gib(extra)})"))
