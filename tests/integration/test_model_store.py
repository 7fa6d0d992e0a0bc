"""The model store against a real HTTP server on 127.0.0.1, with real bytes on disk.

Each test plays one thing that happens to model downloads in the field
(dropped connections, a lying server, wrong bytes, an agent restart, many
services wanting one file, a slow host, a gated repository) and checks what
the reconciler would see: `lookup()` answers, callbacks, files left in the
cache, the requests the server received, and the byte gauges.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from metal_agent.adapters.downloads import TokenUnavailable
from metal_agent.adapters.model_cache import CachePaths
from metal_agent.core.api import SecretRef
from metal_agent.adapters.local_models import read_gguf_header
from metal_agent.adapters.model_files import ModelFiles, ModelPending, ModelReady
from metal_agent.core.api import Model, ModelSource, ModelSpec, ObjectMeta, SourceKind
from metal_agent.core.backoff import Backoff
from metal_agent.core.model_urls import resolve_source
from metal_agent.core.status import Blocker
from metal_agent.core.egress import policy as egress_policy
from tests.support.http_models import ModelHTTPServer, model_bytes, sha256, tls_pair
from tests.support.slowness import scaled
from tests.support.wait import wait_for

MiB = 1 << 20
# What `--download-allow-network 127.0.0.0/8 --token-hosts 127.0.0.1` gives the agent.
LOOPBACK_ALLOWED = egress_policy(["127.0.0.0/8"], ["127.0.0.1"])
FAST = Backoff(initial=0.01, factor=2.0, cap=0.05)
NS = "team"


def http_model(url: str, sha: str | None = None, name: str = "m", kind: SourceKind = SourceKind.HTTP) -> Model:
    return Model(ObjectMeta(NS, name), ModelSpec(source=ModelSource(url, kind), sha256=sha))


class Calls:
    """Records the store's callbacks, with the time of each."""

    def __init__(self) -> None:
        self.ready: list[str] = []
        self.progress: list[tuple[str, float]] = []

    def on_ready(self, key: str) -> None:
        self.ready.append(key)

    def on_progress(self, key: str) -> None:
        self.progress.append((key, time.monotonic()))


@pytest.fixture
async def server():
    srv = await ModelHTTPServer().start()
    yield srv
    await srv.stop()


@pytest.fixture
async def make_store(tmp_path: Path):
    """Stores on one cache directory (a second store is the agent after a restart)."""
    stores: list[ModelFiles] = []

    def make(**kwargs) -> tuple[ModelFiles, Calls, CollectorRegistry]:
        calls, registry = Calls(), CollectorRegistry()
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("progress_interval", 0.05)
        kwargs.setdefault("egress", LOOPBACK_ALLOWED)  # the owner's flag for the test's server
        store = ModelFiles(tmp_path / "cache", calls.on_ready, on_progress=calls.on_progress,
                           registry=registry, **kwargs)
        stores.append(store)
        return store, calls, registry

    yield make
    for store in stores:
        await store.aclose()


async def settle(store: ModelFiles, calls: Calls, model: Model, key: str, **kw):
    """Look up, wait for the store to call back for `key`, and look up again."""
    first = store.lookup(model, key, **kw)
    if not isinstance(first, ModelPending):
        return first
    await wait_for(lambda: key in calls.ready, timeout=20, what=f"on_ready({key})")
    return store.lookup(model, key, **kw)


def cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def gauge(registry: CollectorRegistry, name: str, key: str) -> float | None:
    namespace, svc = key.split("/", 1)
    return registry.get_sample_value(f"llmkube_metal_agent_{name}", {"name": svc, "namespace": namespace})


# -- the happy path -------------------------------------------------------------------


async def test_download_is_verified_placed_atomically_and_recorded(server, make_store, tmp_path):
    data = model_bytes(3 * MiB + 123)
    url = server.add("/models/tiny.gguf", data)
    store, calls, registry = make_store()
    model = http_model(url, sha256(data))

    pending = store.lookup(model, f"{NS}/chat")
    assert isinstance(pending, ModelPending)
    found = await settle(store, calls, model, f"{NS}/chat")

    assert isinstance(found, ModelReady) and found.sha256 == sha256(data)
    assert found.path.read_bytes() == data
    paths = CachePaths.for_url(tmp_path / "cache", url, "tiny.gguf")
    assert found.path == paths.final and len(found.path.parent.name) == 16
    assert cache_files(tmp_path / "cache") == sorted([
        f"{paths.directory.name}/tiny.gguf", f"{paths.directory.name}/tiny.gguf.sha256.json"])
    assert json.loads(paths.sidecar.read_text())["sha256"] == sha256(data)
    assert gauge(registry, "model_download_bytes", f"{NS}/chat") == len(data)
    assert gauge(registry, "model_download_total_bytes", f"{NS}/chat") == len(data)
    assert calls.ready == [f"{NS}/chat"]
    assert [r.range for r in server.requests] == [None]


async def test_restart_trusts_the_sidecar_instead_of_rehashing(server, make_store):
    data = model_bytes(2 * MiB)
    url = server.add("/m.gguf", data)
    store, calls, _ = make_store()
    model = http_model(url, sha256(data))
    found = await settle(store, calls, model, f"{NS}/a")
    assert isinstance(found, ModelReady)

    # Same size and mtime, different bytes: only a re-hash could notice. The
    # restarted store must trust the sidecar (and not download again).
    st = found.path.stat()
    found.path.write_bytes(model_bytes(len(data), seed=5))
    os.utime(found.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh, fresh_calls, _ = make_store()
    again = await settle(fresh, fresh_calls, model, f"{NS}/a")
    assert isinstance(again, ModelReady) and again.sha256 == sha256(data)
    assert len(server.requests) == 1

    # A file that visibly changed (mtime) is re-verified: the digest no longer
    # matches the Model, so it is downloaded again and replaced.
    os.utime(found.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third, third_calls, _ = make_store()
    replaced = await settle(third, third_calls, model, f"{NS}/a")
    assert isinstance(replaced, ModelReady) and replaced.path.read_bytes() == data
    assert len(server.requests) == 2


async def test_same_file_name_from_two_urls_does_not_collide(server, make_store):
    a, b = model_bytes(MiB, seed=1), model_bytes(MiB, seed=2)
    url_a, url_b = server.add("/org-a/model.gguf", a), server.add("/org-b/model.gguf", b)
    store, calls, _ = make_store()
    found_a = await settle(store, calls, http_model(url_a, sha256(a), "a"), f"{NS}/a")
    found_b = await settle(store, calls, http_model(url_b, sha256(b), "b"), f"{NS}/b")
    assert found_a.path.name == found_b.path.name == "model.gguf"
    assert found_a.path != found_b.path
    assert found_a.path.read_bytes() == a and found_b.path.read_bytes() == b


async def test_hf_source_resolves_to_the_resolve_url(server, make_store):
    data = model_bytes(MiB)
    server.add("/org/repo/resolve/v2/sub/q4.gguf", data)
    store, calls, _ = make_store(hf_endpoint=f"http://127.0.0.1:{server.port}")
    model = http_model("hf://org/repo@v2/sub/q4.gguf", sha256(data), kind=SourceKind.HUGGINGFACE)
    found = await settle(store, calls, model, f"{NS}/hf")
    assert isinstance(found, ModelReady) and found.path.read_bytes() == data

    main = resolve_source(ModelSource("hf://org/repo/a/b.gguf", SourceKind.HUGGINGFACE))
    assert main == "https://huggingface.co/org/repo/resolve/main/a/b.gguf"
    repo_only = resolve_source(ModelSource("hf://org/repo", SourceKind.HUGGINGFACE))
    assert isinstance(repo_only, Blocker) and repo_only.reason == "ModelSourceInvalid"


# -- interruptions and restarts ----------------------------------------------------------


async def test_dropped_connections_are_resumed_with_range(server, make_store):
    data = model_bytes(3 * MiB)
    url = server.add("/flaky.gguf", data, drop_after=[700_000, 1_500_000], etag='"v1"')
    store, calls, _ = make_store()
    found = await settle(store, calls, http_model(url, sha256(data)), f"{NS}/flaky")

    assert isinstance(found, ModelReady)
    assert sha256(found.path.read_bytes()) == sha256(data)
    seen = server.requests_for("/flaky.gguf")
    assert [r.range for r in seen] == [None, "bytes=700000-", "bytes=2200000-"]
    assert [r.if_range for r in seen] == [None, '"v1"', '"v1"']
    assert not CachePaths(found.path).partial.exists()


async def test_resume_after_agent_restart_uses_the_partial_on_disk(server, make_store):
    data = model_bytes(3 * MiB)
    url = server.add("/slow.gguf", data, trickle=(32 * 1024, 0.01))  # ~1 s in all
    model = http_model(url, sha256(data))
    first, _, registry = make_store()
    assert isinstance(first.lookup(model, f"{NS}/r"), ModelPending)
    await wait_for(lambda: (gauge(registry, "model_download_bytes", f"{NS}/r") or 0) >= MiB,
                   timeout=20, what="the first MiB")
    await first.aclose()  # the agent stops mid-download

    partial = next((first.cache_dir).rglob("*.partial"))
    kept = partial.stat().st_size
    assert MiB <= kept < len(data)

    server.files["/slow.gguf"].trickle = None
    second, calls, _ = make_store()
    found = await settle(second, calls, model, f"{NS}/r")
    assert isinstance(found, ModelReady) and sha256(found.path.read_bytes()) == sha256(data)
    assert server.requests_for("/slow.gguf")[-1].range == f"bytes={kept}-"
    assert not partial.exists()


# -- integrity -----------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", [
    # announces 1 KiB more than it has, then (asked to resume) admits the real size
    {"lie_extra": 1024},
    # cut mid-file, then answers the range with more bytes than its Content-Range says
    {"drop_after": [MiB], "overflow_on_range": 4096},
], ids=["total-changes", "range-overflows"])
async def test_server_lying_about_the_length_is_rejected(server, make_store, behaviour, tmp_path):
    data = model_bytes(2 * MiB)
    url = server.add("/liar.gguf", data, **behaviour)
    store, calls, _ = make_store()
    found = await settle(store, calls, http_model(url), f"{NS}/liar")

    assert isinstance(found, Blocker), found
    assert found.reason == "ModelLengthMismatch" and found.phase == "Failed"
    assert cache_files(tmp_path / "cache") == []
    assert len(server.requests) == 2


async def test_wrong_bytes_fail_with_both_digests_and_leave_nothing(server, make_store, tmp_path):
    data = model_bytes(MiB)
    wanted = sha256(b"the file the Model author meant")
    url = server.add("/wrong.gguf", data)
    store, calls, _ = make_store()
    model = http_model(url, wanted)
    found = await settle(store, calls, model, f"{NS}/w")

    assert isinstance(found, Blocker) and found.reason == "ModelChecksumMismatch" and found.phase == "Failed"
    assert wanted in found.message and sha256(data) in found.message
    assert cache_files(tmp_path / "cache") == []
    # The failure is remembered: looking again does not download the same wrong bytes.
    assert store.lookup(model, f"{NS}/w") == found
    assert len(server.requests) == 1
    store.retry(model)
    assert isinstance(store.lookup(model, f"{NS}/w"), ModelPending)


async def test_refusals_fail_at_once_and_outages_after_retries(server, make_store):
    store, calls, _ = make_store(max_failures=3)
    missing = await settle(store, calls, http_model(server.url("/nope.gguf"), name="x"), f"{NS}/x")
    assert isinstance(missing, Blocker) and "HTTP 404" in missing.message
    assert len(server.requests_for("/nope.gguf")) == 1

    url = server.add("/down.gguf", model_bytes(1000), fail_with=[503] * 10)
    down = await settle(store, calls, http_model(url, name="y"), f"{NS}/y")
    assert isinstance(down, Blocker) and down.reason == "ModelDownloadFailed"
    assert "failed 3 times" in down.message and "HTTP 503" in down.message
    assert len(server.requests_for("/down.gguf")) == 3


async def test_retry_is_reported_in_the_pending_message(server, make_store):
    data = model_bytes(1000)
    url = server.add("/blip.gguf", data, fail_with=[502])
    store, calls, _ = make_store(backoff=Backoff(initial=0.5, cap=0.5))
    model = http_model(url)
    store.lookup(model, f"{NS}/b")
    message = await wait_for(
        lambda: (m := store.lookup(model, f"{NS}/b")) and isinstance(m, ModelPending) and "retrying" in m.message and m.message,
        timeout=10, what="a retry message")
    assert "HTTP 502" in message and "attempt 1" in message
    assert isinstance(await settle(store, calls, model, f"{NS}/b"), ModelReady)


# -- sharing and independence ------------------------------------------------------------------


async def test_concurrent_lookups_of_one_url_share_one_download(server, make_store):
    data = model_bytes(2 * MiB)
    gate = asyncio.Event()
    url = server.add("/shared.gguf", data, gate=gate)
    store, calls, registry = make_store()
    one, two = http_model(url, sha256(data), "one"), http_model(url, sha256(data), "two")

    assert isinstance(store.lookup(one, f"{NS}/one"), ModelPending)
    assert isinstance(store.lookup(two, f"{NS}/two"), ModelPending)
    await wait_for(lambda: server.requests, timeout=10, what="the download request")
    gate.set()
    await wait_for(lambda: {f"{NS}/one", f"{NS}/two"} <= set(calls.ready), timeout=20, what="both callbacks")

    a, b = store.lookup(one, f"{NS}/one"), store.lookup(two, f"{NS}/two")
    assert isinstance(a, ModelReady) and a == b
    assert len(server.requests) == 1
    for key in (f"{NS}/one", f"{NS}/two"):
        assert gauge(registry, "model_download_bytes", key) == len(data)


async def test_a_slow_download_does_not_delay_other_lookups(server, make_store, tmp_path):
    data = model_bytes(6 * MiB)
    # ~60 s at this pace; the test never waits for it to finish.
    url = server.add("/huge.gguf", data, trickle=(8 * 1024, 0.08))
    local = tmp_path / "local.gguf"
    local.write_bytes(b"GGUF local model")
    store, calls, registry = make_store(progress_interval=0.2)
    slow = http_model(url, name="huge")

    assert isinstance(store.lookup(slow, f"{NS}/slow"), ModelPending)
    await wait_for(lambda: server.responses_started, timeout=10, what="the slow download to start")

    began = time.perf_counter()
    fast = store.lookup(http_model(f"file://{local}", name="local", kind=SourceKind.FILE), f"{NS}/fast")
    took = time.perf_counter() - began
    assert fast == ModelReady(local)
    # Answered while the slow download runs on (it takes ~60 s): nothing waited for it. The
    # duration is a guard, tens of milliseconds on an idle machine (tests/support/slowness.py).
    assert store.downloading() and f"{NS}/slow" not in calls.ready
    assert took < scaled(0.5), took

    # Meanwhile the slow one reports progress, throttled, in its message and gauges.
    await wait_for(lambda: len([k for k, _ in calls.progress if k == f"{NS}/slow"]) >= 4,
                   timeout=10, what="progress callbacks")
    times = [t for k, t in calls.progress if k == f"{NS}/slow"]
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.19
    message = store.lookup(slow, f"{NS}/slow").message
    assert message.startswith("downloading ") and "/6.0 MiB" in message, message
    await wait_for(lambda: " at " in store.lookup(slow, f"{NS}/slow").message, timeout=10, what="a rate")
    assert 0 < gauge(registry, "model_download_bytes", f"{NS}/slow") < len(data)
    assert gauge(registry, "model_download_total_bytes", f"{NS}/slow") == len(data)
    assert f"{NS}/slow" not in calls.ready

    # The service goes away: nobody waits any more, so the download stops (partial kept).
    store.forget(f"{NS}/slow")
    await wait_for(lambda: not store.downloading(), timeout=10, what="the download to stop")
    assert next(store.cache_dir.rglob("*.partial")).exists()
    assert gauge(registry, "model_download_bytes", f"{NS}/slow") is None


# -- credentials ----------------------------------------------------------------------------------


@pytest.fixture
async def tls_server(tmp_path):
    server_ctx, client_ctx = tls_pair(tmp_path / "pki")
    srv = await ModelHTTPServer(tls=server_ctx).start()
    srv.client_ssl = client_ctx
    yield srv
    await srv.stop()


async def test_bearer_token_is_sent_and_never_logged_or_shown(tls_server, make_store):
    """Over https to a host the owner listed (tokens never go over plain http: tests/security)."""
    server = tls_server
    token = "hf_Secr3tTokenValue0123456789"
    data = model_bytes(MiB)
    url = server.add("/gated/m.gguf", data, token=token, drop_after=[300_000])
    asked: list[tuple[str, SecretRef]] = []

    async def provider(namespace: str, ref: SecretRef) -> str | None:
        asked.append((namespace, ref))
        return token

    store, calls, _ = make_store(token_provider=provider, ssl_context=server.client_ssl)
    ref = SecretRef("hf-token")
    with capture_logs() as logs:
        found = await settle(store, calls, http_model(url, sha256(data)), f"{NS}/g", secret_ref=ref)
        # A token the server refuses: the failure names the Secret's role, not the value.
        wrong = "hf_WrongTokenValue987654321"

        async def wrong_provider(namespace: str, ref: SecretRef) -> str | None:
            return wrong

        other, other_calls, _ = make_store(token_provider=wrong_provider, ssl_context=server.client_ssl)
        refused = await settle(other, other_calls, http_model(server.add("/gated/n.gguf", data, token=token)),
                               f"{NS}/n", secret_ref=ref)

    assert isinstance(found, ModelReady) and found.path.read_bytes() == data
    assert asked and asked[0] == (NS, SecretRef("hf-token", "token"))
    assert {r.authorization for r in server.requests_for("/gated/m.gguf")} == {f"Bearer {token}"}
    assert len(server.requests_for("/gated/m.gguf")) == 2  # resumed once, with the token again
    assert isinstance(refused, Blocker) and "HTTP 401" in refused.message and "refused" in refused.message
    assert logs, "expected the downloads to log something"
    for secret in (token, wrong):
        assert secret not in repr(logs)
        assert secret not in refused.message
    assert any(e.get("event") == "model download attempt failed; will retry" for e in logs)


async def test_unreadable_secret_blocks_without_a_request(tls_server, make_store):
    server = tls_server
    url = server.add("/gated/x.gguf", model_bytes(1000), token="t")

    async def forbidden(namespace: str, ref: SecretRef) -> str | None:
        raise TokenUnavailable(Blocker("ModelSecretForbidden", f"the agent's role may not read Secret {namespace}/{ref.name}"))

    store, calls, _ = make_store(token_provider=forbidden)
    found = await settle(store, calls, http_model(url), f"{NS}/s", secret_ref=SecretRef("hf-token"))
    assert found == Blocker("ModelSecretForbidden", f"the agent's role may not read Secret {NS}/hf-token")
    assert server.requests == []


# -- sources that are not downloads ---------------------------------------------------------------


@pytest.mark.parametrize("source,kind,reason", [
    ("pvc://claim/m.gguf", SourceKind.PVC, "ModelSourceUnsupported"),
    ("s3://bucket/m.gguf", SourceKind.S3, "ModelSourceUnsupported"),
    ("llama-3-8b", SourceKind.NAME, "ModelSourceUnsupported"),
    ("/does/not/exist.gguf", SourceKind.PATH, "ModelNotFound"),
])
async def test_unsupported_and_missing_sources_are_refused(make_store, source, kind, reason):
    store, _, _ = make_store()
    found = store.lookup(http_model(source, kind=kind), f"{NS}/z")
    assert isinstance(found, Blocker) and found.reason == reason


async def test_header_reader_reads_a_real_gguf_prefix(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "h.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(2)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(30_000)])  # ~400 KiB of metadata
    writer.add_tensor("w", np.zeros((MiB,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    header, size = read_gguf_header(path, first=64 * 1024)  # forces the grow-and-retry path
    assert size == path.stat().st_size
    assert header.metadata["llama.block_count"] == 2
    assert header.metadata["tokenizer.ggml.tokens"].count == 30_000
    assert 64 * 1024 < header.size < MiB < size


async def test_memory_estimate_reads_the_header_in_a_thread(make_store, tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from metal_agent.core.api import InferenceServiceSpec
    from metal_agent.core.memory import EstimateFailed, MemoryEstimate

    path = tmp_path / "e.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(2)
    writer.add_tensor("w", np.zeros((1024,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    store, _, _ = make_store()

    estimate = await store.memory_estimate(path, InferenceServiceSpec(model_ref="m", context_size=1024))
    assert isinstance(estimate, MemoryEstimate)
    assert estimate.weights_bytes == path.stat().st_size
    assert estimate.kv_bytes == 2 * 1024 * 2 * 32 * 2 * 2  # layers × ctx × kv heads × head dim × (K+V) × f16

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not a model</html>")
    failed = await store.memory_estimate(junk, InferenceServiceSpec(model_ref="m"))
    assert isinstance(failed, EstimateFailed) and "not a GGUF file" in failed.message


async def test_switching_source_abandons_the_download_nobody_needs(server, make_store, tmp_path):
    url = server.add("/abandoned.gguf", model_bytes(2 * MiB), trickle=(8 * 1024, 0.05))
    local = tmp_path / "local.gguf"
    local.write_bytes(b"GGUF")
    store, calls, _ = make_store()
    assert isinstance(store.lookup(http_model(url), f"{NS}/s"), ModelPending)
    await wait_for(lambda: server.responses_started, timeout=10, what="the download to start")

    # Same service, edited to use a local file: the download has no waiter left.
    assert store.lookup(http_model(f"file://{local}", kind=SourceKind.FILE), f"{NS}/s") == ModelReady(local)
    await wait_for(lambda: not store.downloading(), timeout=10, what="the abandoned download to stop")
    assert calls.ready == []


async def test_a_server_ignoring_range_means_starting_over(server, make_store):
    data = model_bytes(2 * MiB)
    url = server.add("/norange.gguf", data, drop_after=[MiB], honour_range=False)
    store, calls, _ = make_store()
    found = await settle(store, calls, http_model(url, sha256(data)), f"{NS}/n")
    assert isinstance(found, ModelReady) and found.path.read_bytes() == data
    assert [r.range for r in server.requests] == [None, f"bytes={MiB}-"]  # asked, got 200, started over


async def test_a_file_changed_while_the_agent_was_down_is_fetched_afresh(server, make_store, tmp_path):
    old, new = model_bytes(2 * MiB, seed=1), model_bytes(2 * MiB, seed=2)
    url = server.add("/changed.gguf", new, etag='"v2"')
    paths = CachePaths.for_url(tmp_path / "cache", url, "changed.gguf")
    paths.directory.mkdir(parents=True)
    paths.partial.write_bytes(old[:MiB])  # left by the previous agent, of the old version
    paths.partial_meta.write_text(json.dumps({"url": url, "total": len(old), "etag": '"v1"', "last_modified": None}))

    store, calls, _ = make_store()
    found = await settle(store, calls, http_model(url, sha256(new)), f"{NS}/c")
    assert isinstance(found, ModelReady) and found.path.read_bytes() == new
    assert [(r.range, r.if_range) for r in server.requests] == [(f"bytes={MiB}-", '"v1"')]


def test_urls_are_redacted_for_logs_and_messages():
    from metal_agent.core.model_urls import redact

    assert redact("https://user:pw@cdn.example.com:8443/m.gguf?X-Amz-Signature=abc#frag") == \
        "https://cdn.example.com:8443/m.gguf"
