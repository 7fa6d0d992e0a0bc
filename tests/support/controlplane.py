"""A real Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1 for tests.

Both binaries are built from their official Go modules by
`scripts/build-controlplane.sh`. The API server runs with RBAC on, so the
agent identity (`metal-agent`, authenticated by a client certificate) is held
to exactly what `manifests/rbac/` grants it. No controller-manager runs:
nothing here needs one (ClusterIPs are allocated by the API server itself),
and its absence keeps the objects under test exactly as the agent left them.

The API server can be stopped and started again on the same port while etcd
keeps the data, which is how outage tests are written.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import aiohttp
import yaml

from tests.support.pki import TestPKI
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for

AGENT_USER = "metal-agent"
SERVICE_CIDR = "10.96.0.0/16"


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    etcd: Path

    @classmethod
    def in_dir(cls, directory: Path) -> "Binaries":
        return cls(directory / "kube-apiserver", directory / "etcd")

    def exist(self) -> bool:
        return all(os.access(p, os.X_OK) for p in (self.kube_apiserver, self.etcd))


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config))
    return path


class ControlPlane:
    """etcd + kube-apiserver on loopback with generated certificates."""

    def __init__(self, binaries: Binaries, workdir: Path, apiserver_args: Sequence[str] = ()) -> None:
        self.binaries = binaries
        self.apiserver_args = tuple(apiserver_args)
        self.dir = workdir
        self.pki = TestPKI(workdir / "pki")
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self._serving = self.pki.serving("apiserver")
        self._sa_key = self.pki.rsa_key("service-account")
        admin = self.pki.client("admin", "admin", ("system:masters",))
        agent = self.pki.client("agent", AGENT_USER)
        self._admin_pair = admin
        self.admin_kubeconfig = write_kubeconfig(
            workdir / "admin.kubeconfig", self.url, self.pki.ca_cert, admin.cert, admin.key, "admin"
        )
        self.agent_kubeconfig = write_kubeconfig(
            workdir / "agent.kubeconfig", self.url, self.pki.ca_cert, agent.cert, agent.key, AGENT_USER
        )
        self.etcd = ManagedProcess("etcd", self._etcd_argv(), workdir / "etcd.log")
        self.apiserver = ManagedProcess("kube-apiserver", self._apiserver_argv(), workdir / "apiserver.log")

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [
            str(self.binaries.etcd),
            "--name=test",
            f"--data-dir={self.dir / 'etcd-data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--unsafe-no-fsync",  # test data: durability across power loss is irrelevant
            "--log-level=warn",
        ]

    def _apiserver_argv(self) -> list[str]:
        sa_key = self._sa_key
        return [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={self._serving.cert}",
            f"--tls-private-key-file={self._serving.key}",
            f"--client-ca-file={self.pki.ca_cert}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={sa_key.with_suffix('.pub')}",
            f"--service-account-signing-key-file={sa_key}",
            # The default reconciler would try to publish 127.0.0.1 as the
            # `kubernetes` Service's endpoint, which the API rejects.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            "--profiling=false",
            "--v=1",
            *self.apiserver_args,
        ]

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self._admin_pair.cert), str(self._admin_pair.key))
        return ctx

    async def _readyz(self) -> bool:
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    f"{self.url}/readyz", ssl=self.ssl_context(), timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def start(self) -> None:
        await self.etcd.start()
        await self.start_apiserver()

    async def start_apiserver(self, timeout: float = 120.0) -> None:
        await self.apiserver.start()
        await wait_for(self._readyz, timeout=timeout, what="kube-apiserver /readyz", on_timeout=self.apiserver.tail)

    async def stop_apiserver(self) -> None:
        await self.apiserver.stop()

    async def stop(self) -> None:
        await self.apiserver.stop()
        await self.etcd.stop()
        shutil.rmtree(self.dir / "etcd-data", ignore_errors=True)

    async def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (what the API server does every
        5 minutes): a watch resumed from an older resourceVersion gets 410 Gone. Returns the
        revision compacted to. Through etcd's own JSON gateway, as etcdctl would over gRPC."""
        base = f"http://127.0.0.1:{self.etcd_port}/v3"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/kv/range", json={"key": "AA==", "limit": 1}) as resp:  # key "\0"
                resp.raise_for_status()
                revision = int((await resp.json())["header"]["revision"])
            async with http.post(f"{base}/kv/compaction", json={"revision": revision, "physical": True}) as resp:
                resp.raise_for_status()
        return revision

    async def metrics_text(self) -> str:
        """The API server's own Prometheus metrics (admin identity)."""
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{self.url}/metrics", ssl=self.ssl_context()) as resp:
                resp.raise_for_status()
                return await resp.text()
