"""LLMKube's own controller and CRDs, for tests of how metal-agent coexists with them.

metal-agent replaces LLMKube's Go Metal Agent in clusters that run the LLMKube
operator, so the agent's claims about that operator are tested against the
operator itself, not a model of it. `scripts/build-llmkube.sh` builds the
manager (`cmd/main.go` of the vendored, pinned LLMKube source) and caches it
with LLMKube's `config/` tree (CRDs, RBAC, samples). This module:

* reads LLMKube's CRDs and samples straight from the vendored tarball, for
  checks that need no build (tests/unit/test_crd_subset.py);
* runs an `LLMKubePlane`: a control plane of its own (not the shared one with
  our CRDs) holding LLMKube's CRDs and our agent's RBAC, with LLMKube's
  manager running out of cluster as cluster admin, the way an operator runs
  it. Its host-path allowlist (`--allowed-host-path-roots`) is one directory,
  `models_root`, where tests put the GGUF files their Models point at.
"""

from __future__ import annotations

import asyncio
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from tests.support.controlplane import Binaries, ControlPlane
from tests.support.kube import api_client, apply, load_documents, wait_crds_established
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
CRD_BASES = "config/crd/bases"


def find_tarball(repo: Path = REPO) -> Path | None:
    """The vendored LLMKube source (`../shared/vendor/llmkube-*.tar.gz`), if this checkout has it."""
    found = sorted((repo.parent / "shared" / "vendor").glob("llmkube-*.tar.gz"))
    return found[0] if found else None


def _documents_in_tarball(tarball: Path, directory: str) -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document directly under `directory`, without extracting."""
    depth = len(directory.split("/"))
    docs: list[tuple[str, dict]] = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = Path(member.name).parts
            if not member.isfile() or not member.name.endswith(".yaml") or "/".join(parts[-depth - 1:-1]) != directory:
                continue
            data = tar.extractfile(member)
            assert data is not None
            docs.extend((parts[-1], d) for d in yaml.safe_load_all(data.read().decode()) if d)
    return docs


def crds_from_tarball(tarball: Path) -> list[dict]:
    """LLMKube's CRDs (every document under config/crd/bases)."""
    return [doc for _, doc in _documents_in_tarball(tarball, CRD_BASES)]


def samples_from_tarball(tarball: Path) -> list[tuple[str, dict]]:
    """LLMKube's own samples (config/samples), as (file name, document)."""
    return _documents_in_tarball(tarball, "config/samples")


def crd_names(crd_dir: Path) -> list[str]:
    return [d["metadata"]["name"] for d in load_documents([crd_dir]) if d.get("kind") == "CustomResourceDefinition"]


@dataclass
class LLMKubePlane:
    """A control plane with LLMKube's CRDs, our agent's role, and LLMKube's manager running.

    Attributes the tests use:
      control_plane     the ControlPlane (stop/start its API server, read its metrics)
      admin_kubeconfig  cluster-admin identity (the manager runs as this)
      agent_kubeconfig  the least-privilege `metal-agent` identity (manifests/rbac)
      assets            the cached LLMKube build: `manager`, `config/` (crd, rbac, samples)
      models_root       the manager's --allowed-host-path-roots: put GGUFs for file:// Models here
      metrics_url       the manager's Prometheus endpoint (plain HTTP, unauthenticated)
      probe_url         the manager's health probes (`/healthz`, `/readyz`)
      manager           the ManagedProcess; `manager_log` / `manager_tail()` for failure messages
    """

    control_plane: ControlPlane
    assets: Path
    models_root: Path
    workdir: Path
    metrics_port: int = field(default_factory=free_port)
    probe_port: int = field(default_factory=free_port)
    manager: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.manager = ManagedProcess("llmkube-manager", self.manager_argv(), self.workdir / "llmkube-manager.log")

    @property
    def admin_kubeconfig(self) -> Path:
        return self.control_plane.admin_kubeconfig

    @property
    def agent_kubeconfig(self) -> Path:
        return self.control_plane.agent_kubeconfig

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def probe_url(self) -> str:
        return f"http://127.0.0.1:{self.probe_port}"

    @property
    def manager_log(self) -> Path:
        return self.manager.log_path

    def manager_tail(self, lines: int = 60) -> str:
        return self.manager.tail(lines)

    @property
    def sample_dir(self) -> Path:
        """LLMKube's own `config/samples` (e.g. inferenceservice_turboquant.yaml)."""
        return self.assets / "config" / "samples"

    def manager_argv(self) -> list[str]:
        """How an operator runs it out of cluster. No --webhook-cert-path, so
        cmd/main.go registers no webhooks (it only wires them when the serving
        certificate exists) and needs no TLS set-up; leader election off, as for
        a single replica; metrics over plain HTTP on loopback. The model cache
        goes to a scratch directory: the default `/models` would be created on
        the host if the suite runs as root."""
        return [
            str(self.assets / "manager"),
            f"--kubeconfig={self.admin_kubeconfig}",
            "--leader-elect=false",
            f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
            "--metrics-secure=false",
            f"--health-probe-bind-address=127.0.0.1:{self.probe_port}",
            f"--allowed-host-path-roots={self.models_root}",
            f"--model-cache-path={self.workdir / 'model-cache'}",
        ]

    async def _ready(self) -> bool:
        if not self.manager.running:
            raise RuntimeError(f"LLMKube's manager exited with {self.manager.proc.returncode}\n{self.manager_tail()}")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{self.probe_url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def start_manager(self, timeout: float = 60.0) -> None:
        """Start LLMKube's manager and wait for its /readyz (its caches are synced by then)."""
        await self.manager.start()
        await wait_for(self._ready, timeout=timeout, what="LLMKube manager /readyz", on_timeout=self.manager_tail)

    async def stop_manager(self) -> None:
        """Stop the controller, e.g. to see what the cluster looks like without it."""
        await self.manager.stop()

    async def install(self) -> None:
        """LLMKube's CRDs (all of config/crd/bases: its manager watches every kind
        there and fails to start without them) and our agent's ClusterRole/binding."""
        crd_dir = self.assets / "config" / "crd" / "bases"
        admin = await api_client(self.admin_kubeconfig)
        try:
            await apply(admin, load_documents([crd_dir]))
            await wait_crds_established(admin, crd_names(crd_dir))
            await apply(admin, load_documents([REPO / "manifests" / "rbac" / "metal-agent.yaml"]))
        finally:
            await admin.close()

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.metrics_url) as resp:
                resp.raise_for_status()
                return await resp.text()


async def start_llmkube_plane(binaries: Binaries, assets: Path, workdir: Path, models_root: Path) -> LLMKubePlane:
    """Control plane up, LLMKube's CRDs and our RBAC in, manager ready. Stop with `stop_llmkube_plane`."""
    (workdir / "controlplane").mkdir(parents=True, exist_ok=True)
    models_root.mkdir(parents=True, exist_ok=True)
    plane = LLMKubePlane(ControlPlane(binaries, workdir / "controlplane"), assets, models_root, workdir)
    try:
        await plane.control_plane.start()
        await plane.install()
        await plane.start_manager()
    except BaseException:
        await stop_llmkube_plane(plane)
        raise
    return plane


async def stop_llmkube_plane(plane: LLMKubePlane) -> None:
    await plane.manager.stop()
    await plane.control_plane.stop()
