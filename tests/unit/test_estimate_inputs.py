"""Memory-estimate inputs: cached by file identity, read in threads of their own, within a time limit.

Files are real (headers built byte by byte in tmp_path); a stalled disk is
a real named pipe, whose read blocks until a writer opens it, so a read
thread really hangs. The admission path (MemoryGuard.check, what a
reconcile awaits) is the real one.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from metal_agent.adapters.local_models import LocalModel
from metal_agent.adapters.model_files import ModelFiles
from metal_agent.core.api import InferenceServiceSpec
from metal_agent.core.memory import EstimateFailed, MemoryEstimate
from metal_agent.core.admission import Admit
from metal_agent.memory.guard import MemoryGuard, Waiting
from tests.support import gguf_forge as f
from tests.support.manifests import workload
from tests.support.wait import wait_for

SPEC = InferenceServiceSpec(model_ref="m", context_size=1024)
GiB = 1 << 30


def honest(path: Path, layers: int = 2) -> Path:
    path.write_bytes(f.header(f.llama_header(layers=layers)) + bytes(64 * 1024))
    return path


class Counting(LocalModel):
    reads: list[str] = []

    def read(self, name: str, offset: int, length: int) -> bytes:
        Counting.reads.append(str(self.path))
        return super().read(name, offset, length)


@pytest.fixture
def store(tmp_path):
    made: list[ModelFiles] = []

    def make(**kwargs) -> ModelFiles:
        files = ModelFiles(tmp_path / "cache", **kwargs)
        files.estimates.reader_for = Counting
        made.append(files)
        return files

    Counting.reads = []
    yield make
    for files in made:
        files.estimates.close()


class Stall:
    """Named pipes whose reads block until released: a disk that hangs."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pipes: list[Path] = []

    def new(self, name: str) -> Path:
        path = self.tmp_path / name
        os.mkfifo(path)
        self.pipes.append(path)
        return path

    def release(self, path: Path) -> None:
        """Open the writing end (the blocked reader then sees end of file)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader (yet): nothing blocked on it
            return
        os.close(fd)


@pytest.fixture
def stall(tmp_path):
    s = Stall(tmp_path)
    yield s
    for path in s.pipes:
        s.release(path)


async def timed(awaitable):
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started


async def test_an_unchanged_model_is_read_once_and_a_changed_one_again(store, tmp_path):
    files = store()
    path = honest(tmp_path / "m.gguf")
    first = await files.memory_estimate(path, SPEC)
    assert isinstance(first, MemoryEstimate)
    reads = len(Counting.reads)
    assert reads >= 1
    for context in (1024, 4096, 32768):  # another service, another context: the same inputs
        again = await files.memory_estimate(path, InferenceServiceSpec(model_ref="m", context_size=context))
        assert isinstance(again, MemoryEstimate) and again.weights_bytes == first.weights_bytes
    assert len(Counting.reads) == reads

    honest(path, layers=4)  # rewritten: another size and mtime, another identity
    changed = await files.memory_estimate(path, SPEC)
    assert isinstance(changed, MemoryEstimate) and changed.kv_bytes == 2 * first.kv_bytes
    assert len(Counting.reads) > reads


async def test_a_hostile_header_is_parsed_once_and_says_why(store, tmp_path):
    files = store()
    path = tmp_path / "hostile.gguf"
    path.write_bytes(f.deep_nesting(4 << 20))
    failed = await files.memory_estimate(path, SPEC)
    assert isinstance(failed, EstimateFailed) and "arrays inside arrays" in failed.message
    reads = len(Counting.reads)
    for _ in range(3):
        assert await files.memory_estimate(path, SPEC) == failed
    assert len(Counting.reads) == reads


async def test_the_cache_is_bounded(store, tmp_path):
    files = store()
    files.estimates.entries = 3
    for i in range(6):
        assert isinstance(await files.memory_estimate(honest(tmp_path / f"m{i}.gguf"), SPEC), MemoryEstimate)
    assert files.estimates.cached() == 3


async def test_a_stalled_read_times_out_with_a_typed_error_and_never_delays_another_model(store, stall, tmp_path):
    files = store(estimate_timeout=1.0)
    pipe = stall.new("stalled.gguf")
    path = honest(tmp_path / "honest.gguf")

    stalled = asyncio.create_task(timed(files.memory_estimate(pipe, SPEC)))
    await wait_for(lambda: str(pipe) in Counting.reads or None, timeout=10, what="the stalled read to start")
    estimate, took = await timed(files.memory_estimate(path, SPEC))
    assert isinstance(estimate, MemoryEstimate) and took < 0.9, took  # while the other read hangs

    failed, took = await stalled
    assert isinstance(failed, EstimateFailed) and "took longer than 1 s" in failed.message, failed
    assert 0.9 < took < 5, took
    assert files.estimates.overdue() == 1
    again, took = await timed(files.memory_estimate(pipe, SPEC))  # no second wait, no second thread
    assert again == failed and took < 0.5, took

    stall.release(pipe)  # the disk comes back: the read ends and its answer is kept
    await wait_for(lambda: files.estimates.overdue() == 0 or None, timeout=10, what="the stalled read to end")
    after = await files.memory_estimate(pipe, SPEC)
    assert isinstance(after, EstimateFailed) and "GGUF" in after.message


async def test_overdue_reads_free_their_slot_and_are_capped(store, stall, tmp_path):
    files = store(estimate_timeout=0.5)
    files.estimates._slots = asyncio.Semaphore(1)  # one read at a time within its limit
    files.estimates.max_overdue = 2
    for name in ("a.gguf", "b.gguf"):
        failed = await files.memory_estimate(stall.new(name), SPEC)
        assert isinstance(failed, EstimateFailed) and "took longer" in failed.message
    assert files.estimates.overdue() == 2
    refused, took = await timed(files.memory_estimate(honest(tmp_path / "m.gguf"), SPEC))
    assert isinstance(refused, EstimateFailed) and "2 reads of other models are stalled" in refused.message
    assert took < 0.5

    stall.release(stall.pipes[0])
    await wait_for(lambda: files.estimates.overdue() == 1 or None, timeout=10, what="one stalled read to end")
    estimate, took = await timed(files.memory_estimate(tmp_path / "m.gguf", SPEC))
    assert isinstance(estimate, MemoryEstimate) and took < 0.5, took  # the slot was not held by the overdue read


async def test_admission_of_an_honest_service_is_not_delayed_by_a_hostile_or_stalled_model(store, stall, tmp_path):
    """What a reconcile awaits: MemoryGuard.check. The hostile service gets MemoryCheckFailed
    with the reason; the honest one is admitted at once while the others are still being read."""
    files = store(estimate_timeout=1.5)
    guard = MemoryGuard(files, CollectorRegistry(), total_ram=lambda: 64 * GiB)
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(f.every_budget_at_once(128 << 20))
    pipe = stall.new("stalled.gguf")
    path = honest(tmp_path / "honest.gguf")

    slow = [asyncio.create_task(guard.check(key, workload(), model)) for key, model in
            (("ns/hostile", hostile), ("ns/stalled", pipe))]
    await wait_for(lambda: (str(hostile) in Counting.reads and str(pipe) in Counting.reads) or None, timeout=10,
                   what="both slow reads to start")
    verdict, took = await timed(guard.check("ns/honest", workload(), path))
    assert isinstance(verdict, Admit) and took < 1.0, took

    hostile_verdict, stalled_verdict = await asyncio.gather(*slow)
    assert isinstance(hostile_verdict, (Admit, Waiting))  # parses in well under the limit: refused or admitted by its numbers
    assert isinstance(stalled_verdict, Waiting) and stalled_verdict.blocker.reason == "MemoryCheckFailed"
    assert "took longer than 1.5 s" in stalled_verdict.blocker.message


async def test_a_draft_file_of_the_set_adds_its_kv_cache_once_and_its_weights_once(store, tmp_path):
    """`draftModel` names a file of the Model's `spec.files`: its bytes are counted with the set's
    files, its KV cache by the draft estimate, neither twice."""
    files = store()
    guard = MemoryGuard(files, CollectorRegistry(), total_ram=lambda: 64 * GiB)
    main, draft = honest(tmp_path / "m.gguf", layers=4), honest(tmp_path / "d.gguf", layers=2)
    plain = workload(source=f"file://{tmp_path}", files=["m.gguf"])
    with_draft = workload({"speculativeDecoding": {"type": "draft", "draftModel": "d.gguf"}},
                          source=f"file://{tmp_path}", files=["m.gguf", "d.gguf"])
    base = await guard._estimate(plain, main, None)
    alone = await files.memory_estimate(draft, with_draft.isvc.spec)
    got = await guard._estimate(with_draft, main, None)
    assert got.weights_bytes == base.weights_bytes + draft.stat().st_size
    assert got.kv_bytes == base.kv_bytes + alone.kv_bytes and alone.kv_bytes > 0
