"""Session fixtures: the real parts every integration test runs against.

Assets (kube-apiserver, etcd, llama-server) are built by `make dev` /
`.ci/run` into ~/.cache/metal-agent; the fixtures only look them up, through
the same scripts, so the suite never starts an eight-minute compile by
surprise. Missing assets skip the tests that need them, unless
METAL_AGENT_REQUIRE_ASSETS=1 (set by `make test` and CI), where a missing
asset is an error: CI must never go green by skipping. With `CI` set, any
other skip is a failure too, listed at the end of the run (tests/ci_skips.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import AsyncIterator

import pytest

from tests import ci_skips
from tests.support import tiny_model as tiny_models
from tests.support.controlplane import Binaries, ControlPlane
from tests.support.kube import api_client, create_namespace, delete_namespace, install_metal_agent

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"


def pytest_configure(config: pytest.Config) -> None:
    ci_skips.configure(config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    ci_skips.as_failure(item, outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    ci_skips.collection_as_failure(outcome.get_result())


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    ci_skips.summary(terminalreporter, config)


def _missing(what: str, hint: str):
    message = f"{what} is not available: {hint}"
    if os.environ.get("METAL_AGENT_REQUIRE_ASSETS") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _cached_asset(script: str) -> Path | None:
    """Ask a build script where its cached output is, without building."""
    env = dict(os.environ, METAL_AGENT_NO_BUILD="1")
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / script)], env=env, capture_output=True, text=True, check=False
    )
    return Path(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None


@pytest.fixture(autouse=True)
def _no_front_door_outlives_its_test(tmp_path_factory):
    """The front door is on by default and outlives its agent on purpose (adopted by the next
    one); a test's agents are gone when it ends, so their front doors go too."""
    yield
    from tests.support.agent import reap_front_doors

    reap_front_doors(under=tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repo: present for developers and CI, absent in users' clones."""
    path = REPO.parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared is not present (only developers and CI have it)")
    return path


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    path = Path(os.environ["METAL_AGENT_LLAMA_SERVER"]) if os.environ.get("METAL_AGENT_LLAMA_SERVER") else _cached_asset("build-llama-server.sh")
    if not path or not os.access(path, os.X_OK):
        _missing("llama-server", "run `make dev` (scripts/build-llama-server.sh) to build it")
    return path


@pytest.fixture(scope="session")
def llama_vocab(llama_server_bin: Path) -> Path:
    return llama_server_bin.parent.parent / "models" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="session")
def tiny_model(llama_vocab: Path) -> Path:
    """A 2-layer llama GGUF with random weights (head dim 32): loads in ~0.1 s."""
    return tiny_models.ensure_model(tiny_models.DEFAULT, llama_vocab)


@pytest.fixture(scope="session")
def tiny_mlx_model() -> Path:
    """A 2-layer llama MLX model directory (hidden 64, random weights, a trained BPE tokenizer)."""
    from tests.support import tiny_mlx_model as tiny_mlx

    return tiny_mlx.ensure_model()


@pytest.fixture(scope="session")
def mlx_server_bin() -> Path:
    """`mlx_lm.server` from the test venv (mlx[cpu] + mlx-lm, the `test` extra): the agent finds it there too."""
    import sys

    path = Path(sys.executable).parent / "mlx_lm.server"
    if not os.access(path, os.X_OK):
        _missing("mlx_lm.server", "run `make dev` (installs the test extra: mlx[cpu], mlx-lm)")
    return path


@pytest.fixture(scope="session")
def tiny_split_model(llama_vocab: Path) -> list[Path]:
    """`tiny_model`'s shape as a split GGUF of two parts (`tiny-split-0000i-of-00002.gguf`, one directory)."""
    return tiny_models.ensure_split_model(tiny_models.DEFAULT, llama_vocab, 2)


@pytest.fixture(scope="session")
def tiny_model_bad_head_dim(llama_vocab: Path) -> Path:
    """Like `tiny_model` but head dim 16, which quantized KV caches cannot divide."""
    return tiny_models.ensure_model(tiny_models.BAD_HEAD_DIM, llama_vocab)


@pytest.fixture(scope="session")
def controlplane_binaries() -> Binaries:
    directory = Path(os.environ["METAL_AGENT_CONTROLPLANE"]) if os.environ.get("METAL_AGENT_CONTROLPLANE") else _cached_asset("build-controlplane.sh")
    binaries = Binaries.in_dir(directory) if directory else None
    if not binaries or not binaries.exist():
        _missing("kube-apiserver/etcd", "run `make dev` (scripts/build-controlplane.sh) to build them")
    return binaries


@pytest.fixture(scope="session")
async def control_plane(controlplane_binaries: Binaries, tmp_path_factory) -> AsyncIterator[ControlPlane]:
    """etcd + kube-apiserver (RBAC on) with our CRDs and the agent's role installed."""
    cp = ControlPlane(controlplane_binaries, tmp_path_factory.mktemp("controlplane"))
    try:
        await cp.start()
        admin = await api_client(cp.admin_kubeconfig)
        try:
            await install_metal_agent(admin)
        finally:
            await admin.close()
        yield cp
    finally:
        await cp.stop()


@pytest.fixture(scope="session")
async def admin_api(control_plane: ControlPlane):
    api = await api_client(control_plane.admin_kubeconfig)
    yield api
    await api.close()


@pytest.fixture(scope="session")
async def agent_api(control_plane: ControlPlane):
    """A client authenticated as the agent identity (User `metal-agent`)."""
    api = await api_client(control_plane.agent_kubeconfig)
    yield api
    await api.close()


@pytest.fixture
async def namespace(admin_api) -> AsyncIterator[str]:
    name = await create_namespace(admin_api)
    yield name
    await delete_namespace(admin_api, name)


# --- LLMKube's own controller and CRDs (tests/support/llmkube.py) -----------


@pytest.fixture(scope="session")
def llmkube_assets() -> Path:
    """The cached build of LLMKube's manager with its `config/` tree (CRDs, RBAC, samples).

    Skips without `../shared` (users' clones have no vendored LLMKube source:
    scripts/build-llmkube.sh exits 4 there); with the source present but not
    built, it is a missing asset like the others (a failure under `make test`).
    """
    from tests.support.llmkube import find_tarball

    if find_tarball() is None:
        pytest.skip("no LLMKube source (../shared/vendor/llmkube-*.tar.gz): only developers and CI have it")
    directory = _cached_asset("build-llmkube.sh")
    if not directory or not os.access(directory / "manager", os.X_OK):
        _missing("LLMKube's manager", "run `make dev` (scripts/build-llmkube.sh) to build it")
    return directory


@pytest.fixture(scope="session")
async def llmkube_plane(controlplane_binaries: Binaries, llmkube_assets: Path, tmp_path_factory):
    """A control plane of its own with LLMKube's CRDs, our agent's role, and LLMKube's
    manager running out of cluster (see LLMKubePlane for the attributes).

    Separate from `control_plane`, which holds our CRDs: the two CRD sets have
    the same names and cannot live in one API server. Session-scoped because
    the manager takes seconds to start; tests isolate themselves by namespace
    (`llmkube_namespace`).
    """
    from tests.support.llmkube import start_llmkube_plane, stop_llmkube_plane

    plane = await start_llmkube_plane(
        controlplane_binaries, llmkube_assets, tmp_path_factory.mktemp("llmkube"), tmp_path_factory.mktemp("llmkube-models")
    )
    try:
        yield plane
    finally:
        await stop_llmkube_plane(plane)


@pytest.fixture(scope="session")
async def llmkube_admin_api(llmkube_plane):
    api = await api_client(llmkube_plane.admin_kubeconfig)
    yield api
    await api.close()


@pytest.fixture(scope="session")
async def llmkube_agent_api(llmkube_plane):
    """The agent identity (User `metal-agent`, manifests/rbac) on the LLMKube plane."""
    api = await api_client(llmkube_plane.agent_kubeconfig)
    yield api
    await api.close()


@pytest.fixture
async def llmkube_namespace(llmkube_admin_api) -> AsyncIterator[str]:
    name = await create_namespace(llmkube_admin_api, prefix="lk")
    yield name
    await delete_namespace(llmkube_admin_api, name)


@pytest.fixture(scope="session")
def llmkube_tiny_model(llmkube_plane, tiny_model: Path) -> Path:
    """`tiny_model` copied under the manager's allowed host-path root, so a
    `file://` Model pointing at it is one LLMKube's Model controller accepts."""
    import shutil

    target = llmkube_plane.models_root / tiny_model.name
    if not target.exists():
        shutil.copyfile(tiny_model, target)
    return target


# --- Toxiproxy between the agent and the API server (tests/support/toxiproxy.py) --


@pytest.fixture(scope="session")
def toxiproxy_dir() -> Path:
    directory = Path(os.environ["METAL_AGENT_TOXIPROXY"]) if os.environ.get("METAL_AGENT_TOXIPROXY") else _cached_asset("build-toxiproxy.sh")
    if not directory or not os.access(directory / "toxiproxy-server", os.X_OK):
        _missing("toxiproxy-server", "run `make dev` (scripts/build-toxiproxy.sh) to build it")
    return directory


@pytest.fixture(scope="session")
async def toxiproxy(toxiproxy_dir: Path, tmp_path_factory):
    """One toxiproxy-server for the session; each test gets its own proxy (`toxic_api`)."""
    from tests.support.toxiproxy import ToxiproxyServer

    server = ToxiproxyServer(toxiproxy_dir, tmp_path_factory.mktemp("toxiproxy"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def toxic_api(toxiproxy, control_plane: ControlPlane, tmp_path):
    """A fresh proxy in front of the API server and an agent-identity kubeconfig through it
    (`.proxy`, `.kubeconfig`). An agent in a network namespace reaches it with
    `netns.forward_into(ns, toxic_api.proxy.port)` and `kubeconfig_via(...)`."""
    from tests.support.toxiproxy import ToxicAPI, kubeconfig_via

    proxy = await toxiproxy.create_proxy(f"127.0.0.1:{control_plane.port}")
    try:
        yield ToxicAPI(proxy, kubeconfig_via(control_plane.agent_kubeconfig, tmp_path / "agent-via-toxiproxy.kubeconfig", proxy.port))
    finally:
        await proxy.delete()
