"""Find the GGUF file a Model names, on this Mac, fetching it when needed.

The reconciler asks `lookup()` and gets one of three answers without ever
waiting on I/O longer than a `stat`: the file is ready, it is on its way
(a download runs in the background and calls back when done), or it cannot
be had, with a reason the user can act on. A download of one model never
delays the lookup of another (LLMKube's agent downloaded inside its one
loop, so one slow model stalled every service).

Sources:
* `file://` and absolute paths: used in place. A file the agent may not
  open is refused with what to do; under ~/Desktop, ~/Documents,
  ~/Downloads or on a volume in /Volumes the message says it is macOS
  privacy protection (TCC) that refuses it (see `adapters.local_models`).
* `http(s)://` and `hf://org/repo[@rev]/path/file.gguf`: downloaded into
  `<cache>/<sha256(url)[:16]>/<file name>` by `adapters.downloads`, one task
  per destination however many services wait for it. An optional bearer
  token comes from the Secret named by `spec.sourceSecretRef`; a source
  whose host may not receive it (`core.egress`: https to the hub or a host
  the owner lists) is refused here, `TokenHostNotAllowed`, before the
  Secret is read or anything is sent.
* `pvc://`, `s3://` and bare catalogue names: refused, with the reason.
* A directory model (MLX, `lookup(..., directory=True)`): a local directory
  holding config.json and *.safetensors, or `hf://org/repo[@rev]` fetched
  whole by `adapters.snapshots` under the same rules as one file.

Callbacks (all take the waiting service's key and must not block):
* `on_ready(key)` when a download the service waits for has finished, for
  good or ill: look the model up again.
* `on_progress(key)` at most every `progress_interval` seconds (default 2)
  while it runs, so the status message and the byte gauges stay fresh.

A download that failed for good is remembered (the lookup returns its
Blocker) for `failure_hold` seconds, or `integrity_failure_hold` when the
bytes were wrong (re-downloading soon would fetch the same wrong bytes);
`retry(model)` forgets it at once, e.g. when the Model is edited.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ssl

import aiohttp
import structlog
from prometheus_client import CollectorRegistry

from metal_agent.adapters.downloads import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_FAILURES,
    DEFAULT_TIMEOUT,
    REASON_FAILED,
    Download,
    DownloadError,
    TokenProvider,
    TokenUnavailable,
)
from metal_agent.adapters import egress_http
from metal_agent.adapters.download_metrics import DownloadMetrics, Throttle
from metal_agent.adapters.estimates import ESTIMATE_TIMEOUT, EstimateInputs
from metal_agent.adapters.local_models import LocalModel, check_local_dir, check_local_file, read_gguf_header
from metal_agent.adapters.model_cache import CachePaths, Verified, safe_file_name
from metal_agent.adapters.model_lookup import Lookup, ModelPending, ModelReady
from metal_agent.adapters.model_sets import lookup_set, present_set, set_failure_keys, with_companions
from metal_agent.adapters.snapshots import HubRepo, SnapshotDownload, resolve_repo, snapshot_paths
from metal_agent.core.api import InferenceServiceSpec, Model, ModelSpec, SecretRef, SourceKind
from metal_agent.core.backoff import Backoff
from metal_agent.core.download_limits import DownloadLimits
from metal_agent.core.egress import REASON_TOKEN_HOST, EgressPolicy, policy
from metal_agent.core.engine import Engine
from metal_agent.core.engine_name import EngineName
from metal_agent.core.engines import engine_for_model
from metal_agent.core.engines.llama_server import LLAMA_SERVER
from metal_agent.core.gguf_header import GGUFError, GGUFHeader
from metal_agent.core.model_urls import HF_ENDPOINT, redact, resolve_source
from metal_agent.core.memory import EstimateFailed, MemoryEstimate
from metal_agent.core.status import Blocker

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class _Job:
    paths: CachePaths
    expected: str | None
    download: Download
    waiters: set[str] = field(default_factory=set)
    task: asyncio.Task | None = None
    throttle: Throttle | None = None


@dataclass(frozen=True)
class _Failure:
    blocker: Blocker
    until: float


class ModelFiles:
    def __init__(
        self,
        cache_dir: Path,
        on_ready: Callable[[str], None] | None = None,
        *,
        on_progress: Callable[[str], None] | None = None,
        registry: CollectorRegistry | None = None,
        token_provider: TokenProvider | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        max_failures: int = DEFAULT_MAX_FAILURES,
        progress_interval: float = 2.0,
        failure_hold: float = 600.0,
        integrity_failure_hold: float = 6 * 3600.0,
        hf_endpoint: str = HF_ENDPOINT,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        egress: EgressPolicy | None = None,
        limits: DownloadLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        estimate_timeout: float = ESTIMATE_TIMEOUT,
        default_engine: EngineName = EngineName.LLAMA_SERVER,
    ) -> None:
        """`egress`: where downloads may connect and tokens may go (default: public addresses,
        tokens to the hub endpoint's host only); `limits`: size cap and free-disk margin;
        `ssl_context`: whom https trusts (default: the system's CAs); `default_engine`: serves
        Models whose format names no engine (--default-runtime)."""
        self.cache_dir = cache_dir
        self.default_engine = default_engine
        self.on_ready = on_ready
        self.on_progress = on_progress
        self.metrics = DownloadMetrics(registry) if registry is not None else None
        self.token_provider = token_provider
        self.backoff = backoff
        self.max_failures = max_failures
        self.progress_interval = progress_interval
        self.failure_hold = failure_hold
        self.integrity_failure_hold = integrity_failure_hold
        self.hf_endpoint = hf_endpoint
        self.timeout = timeout
        self.egress = egress if egress is not None else policy(hub_endpoint=hf_endpoint)
        self.limits = limits or DownloadLimits()
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._jobs: dict[Path, _Job] = {}
        self._ready: dict[Path, Verified] = {}
        self._failures: dict[tuple[Path, str | None], _Failure] = {}
        self._waiting_on: dict[str, set[Path]] = {}
        self.estimates = EstimateInputs(LocalModel, timeout=estimate_timeout)

    # -- the reconciler's entry point ---------------------------------------------

    def engine_of(self, model: Model) -> Engine:
        return engine_for_model(model, self.default_engine)

    def lookup(self, model: Model, key: str | None = None, *, secret_ref: SecretRef | None = None,
               directory: bool | None = None) -> Lookup:
        """Where the model file is, or why not yet, or why never. Never awaits.

        `key` is the InferenceService ("namespace/name") waiting for the
        file; it receives `on_ready`/`on_progress` calls and the byte gauges.
        `secret_ref` is the Model's `spec.sourceSecretRef`, read in the
        Model's namespace when a download starts. `directory`: the engine
        loads a model directory (MLX), not one file; None: as its engine does.
        """
        if directory is None:
            directory = self.engine_of(model).directory_model
        if model.spec.files and not directory:
            return lookup_set(self, model, key, secret_ref)
        where = self._locate(model, directory)
        if isinstance(where, tuple):
            return self._lookup_download(model, key, *where, secret_ref)
        if key is not None:
            self._wait_on(key, set())  # no download (any more) for this service
        return where

    def present(self, model: Model) -> Path | None:
        """The model if it is on this Mac's disk now (a local file or directory, or a finished
        download in the cache), without starting anything: what the fleet's placement prefers.
        Only a complete snapshot directory is ever at its final path (it is renamed there whole)."""
        directory = self.engine_of(model).directory_model
        if model.spec.files and not directory:
            return present_set(self, model)
        where = self._locate(model, directory)
        path = where.path if isinstance(where, ModelReady) else where[1].final if isinstance(where, tuple) else None
        if path is None:
            return None
        return path if (path.is_dir() if directory else path.is_file()) else None

    def _locate(self, model: Model, directory: bool = False) -> Lookup | tuple[str | HubRepo, CachePaths]:
        """A local file's answer, a refusal, or the (URL or hub repository, cache paths) to download."""
        source = model.spec.source
        if source.kind in (SourceKind.FILE, SourceKind.PATH):
            path = Path(source.local_path)
            return (check_local_dir(path) if directory else check_local_file(path)) or ModelReady(path)
        if source.kind in (SourceKind.PVC, SourceKind.S3):
            return Blocker("ModelSourceUnsupported",
                           f"{source.kind.value}:// sources live inside the cluster and are not available on a Mac; "
                           "use an https://, hf:// or file:// source")
        if source.kind is SourceKind.NAME:
            return Blocker("ModelSourceUnsupported",
                           f"source {source.raw!r} is a bare name; give an https://, hf:// or file:// source")
        if directory and source.kind is SourceKind.HUGGINGFACE:
            repo = resolve_repo(source, self.hf_endpoint)
            return repo if isinstance(repo, Blocker) else (repo, snapshot_paths(self.cache_dir, repo))
        url = resolve_source(source, self.hf_endpoint)
        if isinstance(url, Blocker):
            return url
        if not safe_file_name(source.file_name):
            return Blocker("ModelSourceInvalid", f"source {source.raw!r} does not end in a usable file name")
        return url, CachePaths.for_url(self.cache_dir, url, source.file_name)

    def _lookup_download(self, model: Model, key: str | None, url: str | HubRepo, paths: CachePaths,
                         secret_ref: SecretRef | None, expected: str | None | bool = True,
                         wait: bool = True) -> Lookup:
        """Ready if verified and unchanged; else join the running download, repeat a
        remembered failure, or start a download. A token for a host that may not have
        it is refused first: nothing is read or sent. `expected`: the sha256 to verify
        (True: the Model's); `wait`: record that `key` waits for this file alone (a file
        set records all its files itself)."""
        if secret_ref is not None:
            first = url.listing_url if isinstance(url, HubRepo) else url
            why = self.egress.token_refusal(first)
            if why is not None:
                if key is not None and wait:
                    self._wait_on(key, set())
                return Blocker(REASON_TOKEN_HOST, f"the Model names a token (spec.sourceSecretRef) for "
                               f"{redact(first)}, which may not receive it: {why}")
        if expected is True:
            expected = model.spec.sha256
        if key is not None and wait:
            self._wait_on(key, {paths.final})

        ready = self._ready.get(paths.final)
        if ready is not None:
            if self._unchanged(ready):
                if expected in (None, ready.sha256):
                    return ModelReady(ready.path, ready.sha256)
            else:
                del self._ready[paths.final]

        job = self._jobs.get(paths.final)
        if job is not None:
            if key is not None:
                job.waiters.add(key)
            if job.expected != expected:
                return ModelPending("waiting for another download of the same URL (with a different sha256) to finish")
            return ModelPending(job.download.message)

        failure = self._failures.get((paths.final, expected))
        if failure is not None:
            if time.monotonic() < failure.until:
                return failure.blocker
            del self._failures[(paths.final, expected)]

        self._start(model, key, url, paths, secret_ref, expected)
        return ModelPending(f"download of {paths.final.name} is starting")

    def _unchanged(self, ready: Verified) -> bool:
        """The verified file is still the one we verified (a tiny stat)."""
        try:
            st = ready.path.stat()
        except OSError:
            return False
        return st.st_size == ready.size and st.st_mtime_ns == ready.mtime_ns

    def _wait_on(self, key: str, dests: set[Path]) -> None:
        """Record what `key` waits for (empty: no download); a service that switched
        to another source stops waiting for the old downloads, and a download
        nobody waits for any more is cancelled."""
        previous = self._waiting_on.pop(key, set())
        if dests:
            self._waiting_on[key] = dests
        for dest in previous - dests:
            self._leave(key, dest)

    def _leave(self, key: str, dest: Path) -> None:
        job = self._jobs.get(dest)
        if job is None:
            return
        job.waiters.discard(key)
        if not job.waiters and job.task is not None:
            log.info("nobody waits for this download any more; stopping it (the partial file is kept)",
                     url=job.download.where)
            job.task.cancel()

    # -- background downloads ----------------------------------------------------------

    def _session_for_downloads(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = egress_http.session(self.egress, self.timeout, self.ssl_context)
        return self._session

    def _start(self, model: Model, key: str | None, url: str | HubRepo, paths: CachePaths,
               secret_ref: SecretRef | None, expected: str | None) -> None:
        namespace = model.meta.namespace

        async def token() -> str | None:
            if secret_ref is None or self.token_provider is None:
                return None
            return await self.token_provider(namespace, secret_ref)

        job: _Job
        download: Download | SnapshotDownload
        if isinstance(url, HubRepo):
            download = SnapshotDownload(url, paths, session=self._session_for_downloads(), token=token,
                                        backoff=self.backoff, max_failures=self.max_failures,
                                        on_update=lambda: job.throttle(), egress=self.egress, limits=self.limits)
        else:
            download = Download(
                url, paths, expected, session=self._session_for_downloads(), token=token,
                backoff=self.backoff, max_failures=self.max_failures, on_update=lambda: job.throttle(),
                egress=self.egress, limits=self.limits,
            )
        job = _Job(paths, expected, download, waiters={key} if key is not None else set())
        job.throttle = Throttle(self.progress_interval, lambda: self._report(job))
        self._jobs[paths.final] = job
        log.info("model download started", url=download.where, path=str(paths.final),
                 service=key, sha256=expected)
        job.task = asyncio.get_running_loop().create_task(download.run(), name=f"download {paths.final}")
        job.task.add_done_callback(lambda task: self._finished(job, task))

    def _report(self, job: _Job) -> None:
        progress = job.download.progress
        for key in sorted(job.waiters):
            if self.metrics is not None:
                self.metrics.set(key, progress.done, progress.total)
            self._call("on_progress", self.on_progress, key)

    def _finished(self, job: _Job, task: asyncio.Task) -> None:
        job.throttle.cancel()
        if self._jobs.get(job.paths.final) is job:
            del self._jobs[job.paths.final]
        if task.cancelled():
            return
        err = task.exception()
        if err is None:
            verified: Verified = task.result()
            self._ready[job.paths.final] = verified
            for key in job.waiters:
                if self.metrics is not None:
                    self.metrics.set(key, verified.size, verified.size)
        else:
            hold = self.failure_hold
            if isinstance(err, TokenUnavailable):
                blocker = err.blocker
            elif isinstance(err, DownloadError):
                blocker = Blocker(err.reason, err.message)
                if err.integrity:
                    hold = self.integrity_failure_hold
            else:
                log.error("model download crashed", url=job.download.where, exc_info=err)
                blocker = Blocker(REASON_FAILED, f"download from {job.download.where} failed: internal error "
                                  f"({type(err).__name__}); see the agent's log")
            log.warning("model download failed", url=job.download.where, reason=blocker.reason, error=blocker.message)
            self._failures[(job.paths.final, job.expected)] = _Failure(blocker, time.monotonic() + hold)
        for key in sorted(job.waiters):
            self._call("on_ready", self.on_ready, key)

    @staticmethod
    def _call(what: str, fn: Callable[[str], None] | None, key: str) -> None:
        if fn is None:
            return
        try:
            fn(key)
        except Exception:  # noqa: BLE001 - a callback bug must not kill the download
            log.exception("model store callback failed", callback=what, service=key)

    # -- housekeeping ------------------------------------------------------------------

    def forget(self, key: str) -> None:
        """The service is gone: drop its gauges and stop waiting (a download nobody
        else waits for is cancelled; its partial file stays for next time)."""
        for dest in self._waiting_on.pop(key, set()):
            self._leave(key, dest)
        if self.metrics is not None:
            self.metrics.forget(key)

    def retry(self, model: Model) -> None:
        """Forget a remembered failure for this Model's file, so the next lookup tries again."""
        if model.spec.source.kind not in (SourceKind.HTTP, SourceKind.HUGGINGFACE):
            return
        for directory in (False, True):  # the file and the snapshot it might name
            where = self._locate(model, directory)
            if isinstance(where, tuple):
                self._failures.pop((where[1].final, model.spec.sha256), None)
        for paths, expected in set_failure_keys(self, model):
            self._failures.pop((paths, expected), None)

    def downloading(self) -> list[Path]:
        """Destinations with a download in flight (for diagnostics and tests)."""
        return list(self._jobs)

    async def aclose(self) -> None:
        """Cancel downloads (partials stay for the next start) and close the HTTP session."""
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.estimates.close()

    # -- memory estimate inputs --------------------------------------------------------

    async def read_header(self, path: Path) -> tuple[GGUFHeader | GGUFError, int]:
        """The GGUF header of `path` and the file's size, reading only the metadata
        section (in a thread): windows of 1 MiB, never past 128 MiB."""
        return await asyncio.to_thread(read_gguf_header, path)

    async def memory_estimate(self, path: Path, spec: InferenceServiceSpec, engine: Engine = LLAMA_SERVER,
                              model: ModelSpec | None = None) -> MemoryEstimate | EstimateFailed:
        """What the service `spec` will need with the model at `path` under `engine` (see core.memory):
        the files' inputs cached by identity, read in the estimates' own pool within a time limit
        (see adapters.estimates); with the Model's `model` spec, its other files (`spec.files`,
        `spec.mmproj`) beside `path` count too."""
        estimate = engine.estimate_with(await self.estimates.get(path, engine), spec)
        return estimate if model is None else await with_companions(estimate, model, path)
