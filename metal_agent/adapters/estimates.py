"""Memory-estimate inputs of model files: read once per file version, off the loop, in bounded time.

Admission and the fleet's placement ask for a service's memory estimate on
every reconcile. The inputs (a GGUF header's shape and the file size; an MLX
directory's weights and config) depend only on the model's files, and those
files come from whoever wrote the Model's source, so reading them must never
be a way to stall the agent (issue 20):

* **Cached by file identity.** (device, inode, size, mtime in ns) of the
  file, or of the directory and every file in it, names one version of the
  model; a reconcile of an unchanged model is a `stat` and a dict lookup. The
  cache keeps the small inputs (never a header), at most `CACHE_ENTRIES`,
  least recently used first out. Failures are cached too: a hostile header is
  parsed once, not once per reconcile. Changing the file changes its identity.
* **Read in threads of its own**, never the default executor that the rest
  of the agent's `to_thread` calls share: each read gets a daemon thread, at
  most `WORKERS` reads run within their time limit at once, and two services
  on the same file share one read.
* **A time limit** (`tasks.within`, the agent's one timeout helper): past
  `timeout` seconds the caller gets `EstimateFailed` saying so, which
  admission turns into the service's MemoryCheckFailed status, and its
  reconcile carries on. A thread cannot be stopped, so the read runs on and
  its answer is cached when it ends; meanwhile it is *overdue*: it no longer
  counts against `WORKERS` (other models' reads start at once), callers for
  the same file get the timeout answer at once instead of waiting again, and
  at most `MAX_OVERDUE` overdue reads may exist before new reads are refused
  outright (a disk that hangs every read must not grow threads without end).
  What bounds a read's CPU is the parser itself: `core.gguf_header` costs a
  fraction of a second for any header up to its 128 MiB limit, so in practice
  only a stalled disk makes a read overdue.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import structlog

from metal_agent.core.engine import Engine, ModelReader
from metal_agent.core.memory import EstimateFailed
from metal_agent.tasks import within

log = structlog.get_logger(__name__)

ESTIMATE_TIMEOUT = 10.0  # seconds; the worst hostile header costs well under 1 s of CPU, an honest one milliseconds
CACHE_ENTRIES = 256
WORKERS = 4
MAX_OVERDUE = 16

Identity = tuple


def file_identity(path: Path) -> Identity:
    """Blocking: what names this version of the model at `path` (follows symlinks)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    files = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file():
                s = entry.stat()
                files.append((entry.name, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns))
    return (st.st_dev, st.st_ino, st.st_mtime_ns, tuple(sorted(files)))


class EstimateInputs:
    """The cache, the threads and the time limit in front of `Engine.estimate_inputs`."""

    def __init__(self, reader_for: Callable[[Path], ModelReader], *, timeout: float = ESTIMATE_TIMEOUT,
                 entries: int = CACHE_ENTRIES, workers: int = WORKERS, max_overdue: int = MAX_OVERDUE) -> None:
        self.reader_for = reader_for
        self.timeout = timeout
        self.entries = entries
        self.max_overdue = max_overdue
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._reading: dict[tuple, asyncio.Future] = {}
        self._overdue: set[tuple] = set()
        self._slots = asyncio.Semaphore(workers)
        self._closed = False

    async def get(self, path: Path, engine: Engine) -> object:
        """`engine.estimate_inputs` for the model at `path`: cached, or read now (within the limit)."""
        try:
            identity = await within(asyncio.to_thread(file_identity, path), self.timeout)
        except OSError as err:
            return EstimateFailed(f"cannot read {path}: {self.reader_for(path).explain(err)}")
        except TimeoutError:  # a stat that hangs: the disk, not the header
            return self._too_slow(path)
        key = (engine.name, identity)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key in self._overdue:
            return self._too_slow(path)
        if self._closed or (key not in self._reading and len(self._overdue) >= self.max_overdue):
            return EstimateFailed(f"cannot read {path} for the memory estimate now: {len(self._overdue)} reads of "
                                  "other models are stalled (is a disk hanging?); see the agent's log")
        try:
            return await within(self._read(key, path, engine), self.timeout)
        except TimeoutError:
            if key in self._reading and key not in self._overdue:
                self._overdue.add(key)
                self._slots.release()  # an overdue read no longer holds back other models' reads
                log.warning("reading a model's files for its memory estimate is taking too long; the service "
                            "is refused until it ends", path=str(path), timeout_s=self.timeout)
            return self._too_slow(path)
        except Exception as err:  # noqa: BLE001 - an engine bug is one service's failure, not the agent's
            return EstimateFailed(f"cannot read {path}: internal error ({type(err).__name__}); see the agent's log")

    async def _read(self, key: tuple, path: Path, engine: Engine) -> object:
        """Join the read of `key` in flight, or take a slot and start it; its answer."""
        reading = self._reading.get(key)
        if reading is None:
            await self._slots.acquire()
            reading = self._reading.get(key)  # started by another caller while this one waited
            if reading is None:
                reading = self._start(key, path, engine)
            else:
                self._slots.release()
        return await asyncio.shield(reading)

    def _start(self, key: tuple, path: Path, engine: Engine) -> asyncio.Future:
        """Run the read in a daemon thread of its own (a stalled one must not hold up the agent's exit)."""
        loop = asyncio.get_running_loop()
        reading: asyncio.Future = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if reading.done():
                return
            if error is not None:
                reading.set_exception(error)
            else:
                reading.set_result(result)

        def run() -> None:
            try:
                result, error = engine.estimate_inputs(self.reader_for(path)), None
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                result, error = None, err
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                pass  # the loop is closed: the agent is exiting

        self._reading[key] = reading
        reading.add_done_callback(lambda done: self._done(key, path, done))
        threading.Thread(target=run, name=f"metal-agent-estimate {path.name}", daemon=True).start()
        return reading

    def _too_slow(self, path: Path) -> EstimateFailed:
        return EstimateFailed(f"reading {path} for the memory estimate took longer than {self.timeout:g} s; "
                              "a model header that slow to read is not served (an honest one takes milliseconds)")

    def _done(self, key: tuple, path: Path, done: asyncio.Future) -> None:
        self._reading.pop(key, None)
        if key in self._overdue:
            self._overdue.discard(key)
        else:
            self._slots.release()
        if done.cancelled():
            return
        err = done.exception()
        if err is not None:
            log.error("reading a model's files for its memory estimate failed", path=str(path), exc_info=err)
            return
        self._cache[key] = done.result()
        self._cache.move_to_end(key)
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)

    def cached(self) -> int:
        return len(self._cache)

    def overdue(self) -> int:
        return len(self._overdue)

    def close(self) -> None:
        """Start no more reads; one in flight finishes in its daemon thread."""
        self._closed = True
