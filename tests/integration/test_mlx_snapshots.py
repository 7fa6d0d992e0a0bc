"""MLX model directories in the model store: hub snapshots over real HTTP, local directories, estimates.

The hub is played by `tests.support.http_models` (aiohttp on 127.0.0.1):
its repository listing API and resolve URLs, with the misbehaviours of real
links (a connection cut mid-file, a token requirement, bytes that do not
match what the listing says). The files are the tiny generated MLX model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from metal_agent.adapters.model_files import ModelFiles, ModelPending, ModelReady
from metal_agent.adapters.snapshots import MARKER
from metal_agent.core.api import (
    InferenceServiceSpec,
    Model,
    ModelFormat,
    ModelSource,
    ModelSpec,
    ObjectMeta,
    SecretRef,
    SourceKind,
)
from metal_agent.core.backoff import Backoff
from metal_agent.core.engines.mlx_lm import MLX_LM
from metal_agent.core.status import Blocker
from tests.support import tiny_mlx_model
from metal_agent.core.egress import policy as egress_policy
from tests.support.http_models import ModelHTTPServer, add_hub_repo, model_bytes, tls_pair
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.01, factor=2.0, cap=0.05)
NS = "team"


def mlx_model(source: str, kind: SourceKind, name: str = "m") -> Model:
    return Model(ObjectMeta(NS, name), ModelSpec(source=ModelSource(source, kind), format=ModelFormat.MLX))


@pytest.fixture(scope="module")
def mlx_dir() -> Path:
    return tiny_mlx_model.ensure_model()


@pytest.fixture
def repo_files(mlx_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(mlx_dir.iterdir()) if p.is_file()}


@pytest.fixture
async def server(tmp_path):
    """The hub over https (a private repository's token goes only over https)."""
    server_ctx, client_ctx = tls_pair(tmp_path / "pki")
    srv = await ModelHTTPServer(tls=server_ctx).start()
    srv.client_ssl = client_ctx
    yield srv
    await srv.stop()


@pytest.fixture
async def make_store(tmp_path: Path, server):
    stores: list[ModelFiles] = []
    ready: list[str] = []

    def make(**kwargs) -> ModelFiles:
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("progress_interval", 0.05)
        endpoint = server.url("")
        # The owner lets downloads reach the test's loopback hub; its host takes the hub's tokens.
        kwargs.setdefault("egress", egress_policy(["127.0.0.0/8"], hub_endpoint=endpoint))
        store = ModelFiles(tmp_path / "cache", ready.append, hf_endpoint=endpoint, ssl_context=server.client_ssl,
                           **kwargs)
        stores.append(store)
        return store

    make.ready = ready
    yield make
    for store in stores:
        await store.aclose()


async def settle(store: ModelFiles, model: Model, key: str, ready: list[str], **kw):
    first = store.lookup(model, key, **kw)
    if not isinstance(first, ModelPending):
        return first
    await wait_for(lambda: key in ready, timeout=30, what=f"on_ready({key})")
    return store.lookup(model, key, **kw)


async def test_snapshot_is_fetched_whole_verified_and_placed_atomically(server, make_store, repo_files):
    commit = add_hub_repo(server, "org/tiny-mlx", repo_files, revision="v1", lfs=("model.safetensors",))
    store = make_store()
    model = mlx_model("hf://org/tiny-mlx@v1", SourceKind.HUGGINGFACE)

    pending = store.lookup(model, f"{NS}/a")
    assert isinstance(pending, ModelPending)
    assert store.present(model) is None  # a fleet Mac does not count a half-fetched snapshot as on disk
    # A second service wanting the same repository joins the one download.
    assert isinstance(store.lookup(model, f"{NS}/b"), ModelPending)
    assert len(store.downloading()) == 1
    found = await settle(store, model, f"{NS}/a", make_store.ready)
    assert isinstance(found, ModelReady) and found.sha256 == commit
    await wait_for(lambda: f"{NS}/b" in make_store.ready, timeout=10, what="both waiters told")
    assert {p.name: p.read_bytes() for p in found.path.iterdir() if p.name in repo_files} == repo_files
    assert (found.path / MARKER).exists()
    assert not found.path.with_name(found.path.name + ".partial").exists()
    assert store.present(model) == found.path  # ...and does count the complete one
    # Every file was fetched once, from the resolved commit, not the moving revision.
    fetched = [r.path for r in server.requests if "/resolve/" in r.path]
    assert sorted(fetched) == sorted(f"/org/tiny-mlx/resolve/{commit}/{name}" for name in repo_files)

    # The agent after a restart trusts the complete directory without a request.
    before = len(server.requests)
    make_store.ready.clear()
    again = make_store()
    assert isinstance(await settle(again, model, f"{NS}/a", make_store.ready), ModelReady)
    assert len(server.requests) == before

    estimate = await again.memory_estimate(found.path, InferenceServiceSpec(model_ref="m", context_size=1024), MLX_LM)
    assert estimate.weights_bytes > 500_000 and estimate.kv_bytes > 0


async def test_a_cut_connection_resumes_the_file_with_range(server, make_store, repo_files):
    size = len(repo_files["model.safetensors"])
    add_hub_repo(server, "org/flaky", repo_files, lfs=("model.safetensors",),
                 per_file={"model.safetensors": {"drop_after": [200_000], "etag": '"w1"', "trickle": (16 * 1024, 0.005)}})
    store = make_store()
    model = mlx_model("hf://org/flaky", SourceKind.HUGGINGFACE)
    found = await settle(store, model, f"{NS}/f", make_store.ready)
    assert isinstance(found, ModelReady)
    assert (found.path / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    ranges = [r.range for r in server.requests if r.path.endswith("/model.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None
    kept = int(ranges[1].removeprefix("bytes=").rstrip("-"))  # what reached the disk before the cut
    assert 100_000 <= kept <= 200_000 < size


async def test_interrupted_snapshot_resumes_after_an_agent_restart(server, make_store, repo_files):
    add_hub_repo(server, "org/slow", repo_files, lfs=("model.safetensors",),
                 per_file={"model.safetensors": {"trickle": (16 * 1024, 0.02), "etag": '"s1"'}})
    model = mlx_model("hf://org/slow", SourceKind.HUGGINGFACE)
    registry = CollectorRegistry()
    first = make_store(registry=registry)
    assert isinstance(first.lookup(model, f"{NS}/s"), ModelPending)

    def partial_size() -> int:
        return sum(p.stat().st_size for p in first.cache_dir.rglob("model.safetensors.partial"))

    def fetched() -> float:
        return registry.get_sample_value("llmkube_metal_agent_model_download_bytes", {"name": "s", "namespace": NS}) or 0

    await wait_for(lambda: fetched() >= 150_000, timeout=20, what="part of the weights fetched")
    await first.aclose()  # the agent stops mid-download; the partial stays
    kept = partial_size()  # what arrived is written out as the download stops
    assert kept >= 100_000
    server.files[next(p for p in server.files if p.endswith("/model.safetensors"))].trickle = None
    make_store.ready.clear()

    second = make_store()
    found = await settle(second, model, f"{NS}/s", make_store.ready)
    assert isinstance(found, ModelReady)
    assert (found.path / "model.safetensors").read_bytes() == repo_files["model.safetensors"]
    ranges = [r.range for r in server.requests if r.path.endswith("/model.safetensors")]
    assert ranges[0] is None and ranges[-1] == f"bytes={kept}-"


async def test_bytes_that_do_not_match_the_listing_fail_for_good(server, make_store, repo_files):
    add_hub_repo(server, "org/bad", repo_files, lfs=("model.safetensors",),
                 lie={"model.safetensors": {"lfs": {"sha256": "0" * 64, "size": len(repo_files["model.safetensors"])}},
                      "config.json": {"blobId": "1" * 40}})
    store = make_store()
    found = await settle(store, mlx_model("hf://org/bad", SourceKind.HUGGINGFACE), f"{NS}/x", make_store.ready)
    assert isinstance(found, Blocker)
    assert found.reason in ("ModelChecksumMismatch", "ModelLengthMismatch")
    final = next(store.cache_dir.iterdir()) / "bad"
    assert not final.exists()  # nothing incomplete or wrong at the final path


async def test_a_private_repository_needs_the_secret_token(server, make_store, repo_files):
    add_hub_repo(server, "org/private", repo_files, token="s3cret")
    asked: list[tuple[str, SecretRef]] = []

    async def token(namespace: str, ref: SecretRef) -> str:
        asked.append((namespace, ref))
        return "s3cret"

    model = mlx_model("hf://org/private", SourceKind.HUGGINGFACE)
    refused = await settle(make_store(), model, f"{NS}/p", make_store.ready)
    assert isinstance(refused, Blocker) and "sourceSecretRef" in refused.message

    make_store.ready.clear()
    store = make_store(token_provider=token)
    store._failures.clear()
    found = await settle(store, model, f"{NS}/p", make_store.ready, secret_ref=SecretRef("hf-token"))
    assert isinstance(found, ModelReady) and asked and asked[0] == (NS, SecretRef("hf-token"))
    authed = [r for r in server.requests if r.authorization]
    assert authed and all(r.authorization == "Bearer s3cret" for r in authed)


async def test_local_directories_are_checked_before_anything_starts(make_store, mlx_dir, tmp_path, tiny_model):
    store = make_store()
    ready = store.lookup(mlx_model(str(mlx_dir), SourceKind.PATH), f"{NS}/ok")
    assert isinstance(ready, ModelReady) and ready.path == mlx_dir

    no_config = tmp_path / "no-config"
    shutil.copytree(mlx_dir, no_config)
    (no_config / "config.json").unlink()
    refused = store.lookup(mlx_model(f"file://{no_config}", SourceKind.FILE), f"{NS}/nc")
    assert isinstance(refused, Blocker) and refused.reason == "ModelSourceInvalid"
    assert "has no config.json" in refused.message

    gguf = store.lookup(mlx_model(str(tiny_model), SourceKind.PATH), f"{NS}/g")
    assert isinstance(gguf, Blocker) and "is a GGUF file" in gguf.message and "format to gguf" in gguf.message

    missing = store.lookup(mlx_model(str(tmp_path / "absent"), SourceKind.PATH), f"{NS}/m")
    assert isinstance(missing, Blocker) and missing.reason == "ModelNotFound"

    junk = tmp_path / "junk"
    shutil.copytree(mlx_dir, junk)
    (junk / "model.safetensors").write_bytes(model_bytes(64))
    failed = await store.memory_estimate(junk, InferenceServiceSpec(model_ref="m"), MLX_LM)
    assert "not a safetensors file" in failed.message


async def test_a_revision_that_moved_between_attempts_is_fetched_anew(server, make_store, repo_files):
    """The first attempt finished config.json of commit A and part of the weights; by the
    second, `main` points at commit B with another config.json: B is what lands, whole."""
    add_hub_repo(server, "org/moving", repo_files, commit="a" * 40, lfs=("model.safetensors",),
                 per_file={"model.safetensors": {"trickle": (16 * 1024, 0.02)}})
    model = mlx_model("hf://org/moving", SourceKind.HUGGINGFACE)
    registry = CollectorRegistry()
    first = make_store(registry=registry)
    assert isinstance(first.lookup(model, f"{NS}/mv"), ModelPending)
    await wait_for(lambda: (registry.get_sample_value("llmkube_metal_agent_model_download_bytes",
                                                      {"name": "mv", "namespace": NS}) or 0) >= 100_000,
                   timeout=20, what="config.json done and part of the weights")
    await first.aclose()

    moved = dict(repo_files, **{"config.json": repo_files["config.json"].replace(b'"rms_norm_eps": 1e-05',
                                                                                 b'"rms_norm_eps": 1e-06')})
    assert moved["config.json"] != repo_files["config.json"]
    add_hub_repo(server, "org/moving", moved, commit="b" * 40, lfs=("model.safetensors",))
    make_store.ready.clear()
    found = await settle(make_store(), model, f"{NS}/mv", make_store.ready)
    assert isinstance(found, ModelReady) and found.sha256 == "b" * 40
    assert (found.path / "config.json").read_bytes() == moved["config.json"]
