"""The download rules through the whole agent (real kube-apiserver, real HTTP servers, real llama-server).

What a namespace user sees when a Model's source tries to reach the Mac or
to send the namespace's token elsewhere: the InferenceService fails with a
reason naming the rule, the servers behind the refused URLs receive
nothing, and the same agent goes on serving an honest Model from the one
network its owner allowed (`--download-allow-network 127.0.0.2/32`).
"""

from __future__ import annotations

import base64

import pytest
from kubernetes_asyncio import client

from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.http_models import ModelHTTPServer, model_bytes
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

TOKEN = "hf_AgentLevelTenantT0ken0123456789"
ALLOWED = "127.0.0.2"


async def failed_with(cluster: Cluster, name: str, reason: str):
    status = await cluster.status(name)
    for cond in status.get("conditions") or []:
        if cond.get("reason") == reason and cond.get("status") == "False":
            return status, cond
    return None


async def test_refused_sources_fail_with_their_reason_and_the_agent_serves_an_honest_one(
        control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    victim = await ModelHTTPServer("127.0.0.1").start()  # the Mac itself
    allowed = await ModelHTTPServer(ALLOWED).start()
    agent = AgentProcess(AgentOptions(
        kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin, workdir=tmp_path,
        namespaces=(namespace,), download_networks=(f"{ALLOWED}/32",),
        extra_args=("--token-hosts", "models.example.com"),
    ))
    try:
        await client.CoreV1Api(admin_api).create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name="hf"), data={"token": base64.b64encode(TOKEN.encode()).decode()}))
        loopback = victim.add("/m.gguf", tiny_model.read_bytes())
        await cluster.create_model("loopback", loopback)
        to_metadata = allowed.redirect("/redirect.gguf", "http://169.254.169.254/latest/meta-data/m.gguf")
        await cluster.create_model("metadata", to_metadata)
        # A token for a host the owner did not list, and over plain http.
        await cluster.create_model("leak", allowed.add("/leak.gguf", model_bytes(1000)),
                                   sourceSecretRef={"name": "hf", "key": "token"})
        await cluster.create_model("honest", allowed.add("/tiny.gguf", tiny_model.read_bytes()))
        await agent.start()
        for name in ("loopback", "metadata", "leak", "honest"):
            await cluster.create_isvc(name, name, contextSize=256)

        for name, reason in (("loopback", "DownloadAddressNotAllowed"), ("metadata", "DownloadAddressNotAllowed"),
                             ("leak", "TokenHostNotAllowed")):
            status, cond = await wait_for(lambda: failed_with(cluster, name, reason), timeout=60,
                                          what=f"{name} to fail with {reason}")
            assert status["phase"] == "Failed", status
            assert TOKEN not in str(status)
        await cluster.wait_phase("honest", "Ready", timeout=90)

        assert victim.requests == []  # nothing reached the Mac's own loopback server
        assert [r.path for r in allowed.requests if r.path != "/tiny.gguf"] == ["/redirect.gguf"]
        assert all(r.authorization is None for r in allowed.requests)  # no token over http, to anyone
        assert agent.process.running
        assert TOKEN not in agent.log_text()
        assert not [p for p in (tmp_path / "models").rglob("*") if p.is_file() and p.name.startswith(("m.gguf", "redirect", "leak"))]
    finally:
        if agent.process and agent.process.running:
            await agent.stop()
        await victim.stop()
        await allowed.stop()
        kill_recorded_processes(tmp_path / "state")
