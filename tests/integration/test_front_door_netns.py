"""Issue 21, item 2 end to end: who gets through the front door, decided on the wire.

The "Mac" is a network namespace running the real agent with `--front-door` in its default `cluster`
access mode; it spawns the real front door and real llama-servers. Clients in the root namespace
connect from addresses of their own (netns.add_sources), as separate machines would:

- "cluster node": its address is a Node's InternalIP in the real kube-apiserver, so it is let in
  without a credential, and stops being let in when the Node goes;
- "LAN stranger": no credential (401) or a made-up key (403), an OpenAI-shaped body either way,
  and the engine never sees the request;
- "token holder": a real ServiceAccount token bound by the shipped sample Role
  (manifests/samples/front-door-client.yaml) to one service: allowed there, 403 on the other;
- "key of another service": a service's API key (from the Secret its annotation names, read under
  manifests/rbac/optional-api-key-reader.yaml) works on that service only.

The access decision's every corner is in tests/security/test_front_door_access.py; this file proves
the agent, the front door and the cluster wire it together.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal

import aiohttp
import pytest
from kubernetes_asyncio import client

from metal_agent.adapters.kube.api_keys import ANNOTATION
from metal_agent.adapters.process.front_door_process import RECORD_FILE, read_record
from metal_agent.adapters.process.records import live_process
from tests.support import netns
from tests.support.agent import agents_in_netns
from tests.support.front_door import accepting, handed
from tests.support.front_door_grants import grant_client, grant_key_reader
from tests.support.isvc import GROUP, MERGE_PATCH, VERSION, Cluster
from tests.support.kube import service_account_token
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

CODE_KEY = "code-key-" + "7" * 32
CHAT = "/v1/chat/completions"


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    args = ("--front-door", "--heartbeat-interval", "1")  # access: cluster, the default
    try:
        async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                                   llama_server=llama_server_bin, workdir=tmp_path, namespaces=(namespace,),
                                   extra_args=args) as (ns, make_agent):
            yield cluster, ns, make_agent, tmp_path
    finally:
        record = read_record(tmp_path / "state" / RECORD_FILE)
        if record is not None and live_process(record):  # the front door outlives agents by design
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)


class Client:
    """A machine on the network at `source`, calling the Mac at `host`."""

    def __init__(self, source: str, host: str) -> None:
        self.source, self.host = source, host

    async def call(self, port: int, model: str, credential: str | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        connector = aiohttp.TCPConnector(local_addr=(self.source, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(f"http://{self.host}:{port}{CHAT}", json=body, headers=headers) as resp:
                return resp.status, json.loads(await resp.text())

    async def status(self, port: int, model: str, credential: str | None = None) -> int:
        return (await self.call(port, model, credential))[0]


def _ports(workdir) -> dict[str, int]:
    path = workdir / "state" / "front-door-ports.json"
    return json.loads(path.read_text())["ports"] if path.exists() else {}


def _engine_requests(workdir, namespace: str, name: str) -> int:
    """Completions the engine itself took on, from its own log: llama-server logs "processing task"
    when a slot starts one (it does not log requests themselves)."""
    path = workdir / "logs" / f"{namespace}__{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return sum(1 for line in text.splitlines() if "processing task" in line)


async def _serve_two(cluster: Cluster, admin_api, namespace: str, workdir) -> dict[str, int]:
    """`chat` (no key) and `code` (a key from Secret code-keys), both Ready; their stable ports."""
    core = client.CoreV1Api(admin_api)
    await core.create_namespaced_secret(namespace, {"metadata": {"name": "code-keys"}, "data": {
        "api-key": base64.b64encode(CODE_KEY.encode()).decode()}})
    await grant_key_reader(admin_api, namespace, ["code-keys"])
    await grant_client(admin_api, namespace, "chat")
    await cluster.create_isvc("chat", "tiny", contextSize=256)
    await cluster.create_isvc("code", "tiny", contextSize=256)
    await cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "inferenceservices", "code",
        {"metadata": {"annotations": {ANNOTATION: "code-keys"}}}, _content_type=MERGE_PATCH)
    for name in ("chat", "code"):
        await cluster.wait_phase(name, "Ready", timeout=90)
    ports = await wait_for(lambda: len(_ports(workdir)) == 2 and _ports(workdir), timeout=30, what="two stable ports")
    for name in ("chat", "code"):  # phase Ready can come before the front door listens (the slice waits)
        await wait_for(lambda: handed(workdir / "state", f"{namespace}/{name}"), timeout=30, what=f"{name} handed")
    return {"chat": ports[f"{namespace}/chat"], "code": ports[f"{namespace}/code"]}


async def test_the_cluster_a_stranger_a_token_holder_and_another_services_key_on_the_wire(mac, admin_api):
    cluster, ns, make_agent, workdir = mac
    namespace = cluster.ns
    await make_agent().start()
    ports = await _serve_two(cluster, admin_api, namespace, workdir)
    node_ip, stranger_ip = await netns.add_sources(ns, 2)
    node, stranger = Client(node_ip, ns.inner_ip), Client(stranger_ip, ns.inner_ip)
    for port in ports.values():
        await wait_for(lambda: accepting(ns.inner_ip, port), timeout=30, what="the front door listening")
    core = client.CoreV1Api(admin_api)
    node_name = f"worker-{namespace}"
    await core.create_node({"metadata": {"name": node_name}})
    try:
        await core.patch_node_status(node_name, {"status": {"addresses": [{"type": "InternalIP", "address": node_ip}]}})
        # The cluster node: in without a credential once the agent has seen the Node.
        await wait_for(lambda: _is(node.status(ports["chat"], "chat"), 200), timeout=30, what="the Node's address let in")
        assert await node.status(ports["code"], "code") == 200

        # The engine has answered exactly one completion: the refusals before the Node counted never reached it.
        logged = lambda: _engine_requests(workdir, namespace, "chat")  # noqa: E731
        assert await wait_for(logged, timeout=10, what="the engine's log of the first completion") == 1

        # The stranger: refused, OpenAI-shaped.
        for credential, refused in ((None, 401), ("sk-made-up-" + "0" * 32, 403)):
            status, body = await stranger.call(ports["chat"], "chat", credential)
            assert status == refused, body
            assert set(body["error"]) >= {"message", "type", "code"} and "0" * 32 not in json.dumps(body)

        # The token holder: allowed on the service its Role names, refused on the other.
        token = await service_account_token(admin_api, namespace, "chat-client")
        assert await stranger.status(ports["chat"], "chat", token) == 200
        status, body = await stranger.call(ports["code"], "code", token)
        assert status == 403 and token not in json.dumps(body), body

        # A service's key: good on its own service, refused on another.
        assert await stranger.status(ports["code"], "code", CODE_KEY) == 200
        status, body = await stranger.call(ports["chat"], "chat", CODE_KEY)
        assert status == 403 and CODE_KEY not in json.dumps(body), body
        # The engine saw the token holder's request and none of the refused ones.
        await wait_for(lambda: logged() >= 2, timeout=10, what="the engine's log of the token holder's completion")
        assert logged() == 2
    finally:
        await core.delete_node(node_name)
    # Kept current: the Node gone, its address is a stranger's.
    await wait_for(lambda: _is(node.status(ports["chat"], "chat"), 401), timeout=30, what="the deleted Node refused")


async def _is(status, wanted: int) -> bool:
    return await status == wanted
