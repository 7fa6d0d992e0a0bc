"""MLX models end to end: a real agent runs mlx_lm.server (mlx[cpu]) beside llama-server.

The "Mac" is a network namespace with a routable address (as in
test_registration): the agent registers it, and the test plays a cluster
client that reads the EndpointSlice and sends a chat completion to the
registered address. The MLX model is the generated tiny one
(tests/support/tiny_mlx_model.py); mlx_lm.server comes from the test venv,
where the agent finds it as it would in its own venv on a Mac.
"""

from __future__ import annotations

import os
import shutil
import signal

import aiohttp
import psutil
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.engines.mlx_lm import ONE_MODEL
from tests.support import netns
from tests.support.agent import AgentOptions, AgentProcess, agents_in_netns, kill_recorded_processes
from tests.support.isvc import Cluster
from tests.support.procs import process_gone
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LOAD_TIMEOUT = 120  # python + mlx import and load on a shared 2-core machine: seconds, generously bounded


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tiny_mlx_model, mlx_server_bin,
              tmp_path):
    if not netns.available():
        pytest.skip("needs root and iproute2 for network namespaces")
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny-mlx", f"file://{tiny_mlx_model}", format="mlx")
    await cluster.create_model("tiny", f"file://{tiny_model}")
    async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                               llama_server=llama_server_bin, workdir=tmp_path, namespaces=(namespace,),
                               # the engine registered itself (its --host, its port in the slice)
                               extra_args=("--no-front-door", "--liveness-interval", "0.5", "--liveness-failures",
                                           "2", "--heartbeat-interval", "1")) as (ns, make_agent):
        yield cluster, ns, make_agent


async def ready_slice(cluster: Cluster, name: str):
    slices = await client.DiscoveryV1Api(cluster.api).list_namespaced_endpoint_slice(
        cluster.ns, label_selector=f"kubernetes.io/service-name={name}")
    found = slices.items[0] if slices.items else None
    return found if found and found.endpoints and found.endpoints[0].conditions.ready else None


async def chat_through_slice(cluster: Cluster, name: str) -> dict:
    """What a cluster client does: find the ready endpoint, send a chat completion there."""
    found = await wait_for(lambda: ready_slice(cluster, name), timeout=30, what=f"ready slice of {name}")
    address, port = found.endpoints[0].addresses[0], found.ports[0].port
    # Like any OpenAI client, name a model: the server answers with the one it serves,
    # it never fetches or loads what a request names.
    body = {"model": "someone/another-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{address}:{port}/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=60)) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
    assert answer["choices"] and answer["usage"]["completion_tokens"] >= 1
    return answer


async def ready_pid(agent: AgentProcess, key: str, not_pid: int | None = None) -> int | None:
    for row in await agent.services():
        if row["service"] == key and row["state"] == "Ready" and row["pid"] != not_pid:
            return row["pid"]
    return None


def argv_of(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()


def flag(pid: int, name: str) -> str:
    argv = argv_of(pid)
    return argv[argv.index(name) + 1]


async def test_mlx_service_full_loop(mac, tiny_mlx_model):
    cluster, ns, make_agent = mac
    agent = make_agent()
    await agent.start()
    key = f"{cluster.ns}/mlx-chat"
    await cluster.create_isvc("mlx-chat", "tiny-mlx", contextSize=1024)
    await cluster.wait_phase("mlx-chat", "Ready", timeout=LOAD_TIMEOUT)
    pid = await ready_pid(agent, key)
    assert argv_of(pid)[1:3] == ["-c", ONE_MODEL]  # mlx-lm's interpreter runs it: argv is the cmdline
    assert flag(pid, "--model") == str(tiny_mlx_model) and flag(pid, "--host") == ns.inner_ip
    assert flag(pid, "--decode-concurrency") == "1"
    assert (await cluster.condition("mlx-chat", "MetalProcessReady"))["message"].startswith(
        "mlx_lm.server is serving on port")
    await cluster.wait_event("mlx-chat", "Started")
    assert any(e.message.startswith("mlx_lm.server started") for e in await cluster.events("mlx-chat"))
    svc = await cluster.core.read_namespaced_service("mlx-chat", cluster.ns)
    assert svc.metadata.labels["inference.llmkube.dev/runtime"] == "mlx"
    assert (await agent.metric("llmkube_metal_agent_memory_estimated_bytes",
                               {"name": "mlx-chat", "namespace": cluster.ns}) or 0) > 256 << 20
    await chat_through_slice(cluster, "mlx-chat")

    # A spec change respawns it once, with the new command line.
    await cluster.patch_isvc("mlx-chat", {"parallelSlots": 2})
    new_pid = await wait_for(lambda: ready_pid(agent, key, not_pid=pid), timeout=LOAD_TIMEOUT, what="respawned")
    assert process_gone(pid) and flag(new_pid, "--decode-concurrency") == "2"
    assert "Respawning" in await cluster.event_reasons("mlx-chat")
    await chat_through_slice(cluster, "mlx-chat")

    # A crash is restarted.
    pid, _ = new_pid, os.kill(new_pid, signal.SIGKILL)
    pid = await wait_for(lambda: ready_pid(agent, key, not_pid=pid), timeout=LOAD_TIMEOUT, what="restarted")
    await chat_through_slice(cluster, "mlx-chat")

    # An agent restart adopts the running server: same process, no reload.
    created = psutil.Process(pid).create_time()
    agent.kill()
    successor = make_agent()
    await successor.start()
    assert await wait_for(lambda: ready_pid(successor, key), timeout=60, what="adopted") == pid
    assert psutil.Process(pid).create_time() == created
    assert any(row["adopted"] for row in await successor.services() if row["service"] == key)
    await chat_through_slice(cluster, "mlx-chat")
    # The successor knew the engine from the process record before it read the spec.
    svc = await cluster.core.read_namespaced_service("mlx-chat", cluster.ns)
    assert svc.metadata.labels["inference.llmkube.dev/runtime"] == "mlx"
    assert (await cluster.condition("mlx-chat", "MetalProcessReady"))["message"].startswith("mlx_lm.server")

    # Delete cleans up: process and Service gone.
    await cluster.delete_isvc("mlx-chat")
    await wait_for(lambda: process_gone(pid), timeout=20, what="mlx_lm.server to exit")

    async def service_gone() -> bool:
        try:
            await cluster.core.read_namespaced_service("mlx-chat", cluster.ns)
        except ApiException as err:
            return err.status == 404
        return False

    await wait_for(service_gone, timeout=20, what="Service deleted")


async def test_one_mac_serves_gguf_and_mlx_at_once(mac):
    cluster, ns, make_agent = mac
    agent = make_agent()
    await agent.start()
    await cluster.create_isvc("gguf-chat", "tiny", contextSize=512)
    await cluster.create_isvc("mlx-chat", "tiny-mlx", contextSize=512)
    await cluster.wait_phase("gguf-chat", "Ready", timeout=LOAD_TIMEOUT)
    await cluster.wait_phase("mlx-chat", "Ready", timeout=LOAD_TIMEOUT)
    gguf = await ready_pid(agent, f"{cluster.ns}/gguf-chat")
    mlx = await ready_pid(agent, f"{cluster.ns}/mlx-chat")
    assert os.path.basename(argv_of(gguf)[0]) == "llama-server" and argv_of(mlx)[1:3] == ["-c", ONE_MODEL]
    for name, runtime in (("gguf-chat", "llamacpp"), ("mlx-chat", "mlx")):
        svc = await cluster.core.read_namespaced_service(name, cluster.ns)
        assert svc.metadata.labels["inference.llmkube.dev/runtime"] == runtime
        await chat_through_slice(cluster, name)


@pytest.fixture
async def local_env(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tiny_mlx_model, mlx_server_bin,
                    tmp_path):
    cluster = Cluster(admin_api, namespace)
    agent = AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                      workdir=tmp_path, namespaces=(namespace,)))
    yield cluster, agent
    if agent.process and agent.process.running:
        await agent.stop()
    kill_recorded_processes(tmp_path / "state")


async def _condition_says(cluster: Cluster, name: str, reason: str, *needles: str):
    cond = await cluster.condition(name, "Available")
    if cond and cond["reason"] == reason and all(n in cond["message"] for n in needles):
        return cond
    return None


async def test_bad_mlx_specs_get_clear_conditions_and_leave_others_alone(local_env, tiny_model, tiny_mlx_model,
                                                                          tmp_path):
    cluster, agent = local_env
    await cluster.create_model("tiny", f"file://{tiny_model}")
    await cluster.create_model("tiny-mlx", f"file://{tiny_mlx_model}", format="mlx")
    no_config = tmp_path / "mlx-without-config"
    shutil.copytree(tiny_mlx_model, no_config)
    (no_config / "config.json").unlink()
    await cluster.create_model("no-config", f"file://{no_config}", format="mlx")
    await cluster.create_model("gguf-as-mlx", f"file://{tiny_model}", format="mlx")
    await agent.start()
    await cluster.create_isvc("anchor", "tiny", contextSize=512)
    await cluster.wait_phase("anchor", "Ready")
    anchor = await ready_pid(agent, f"{cluster.ns}/anchor")

    await cluster.create_isvc("bad-kv", "tiny-mlx", cacheTypeK="q4_1", cacheTypeV="q4_1")
    await cluster.create_isvc("no-config", "no-config")
    await cluster.create_isvc("gguf-as-mlx", "gguf-as-mlx")
    await wait_for(lambda: _condition_says(cluster, "bad-kv", "InvalidSpec", "spec.cacheTypeK", "8 or 4 bits"),
                   timeout=30, what="bad-kv refused")
    await wait_for(lambda: _condition_says(cluster, "no-config", "ModelSourceInvalid", "has no config.json"),
                   timeout=30, what="no-config refused")
    await wait_for(lambda: _condition_says(cluster, "gguf-as-mlx", "InvalidSpec", "spec.format", "GGUF file"),
                   timeout=30, what="gguf-as-mlx refused")
    assert "InvalidSpec" in await cluster.event_reasons("bad-kv")

    # Nothing was started for them, and the healthy service was never touched.
    assert [row["service"] for row in await agent.services()] == [f"{cluster.ns}/anchor"]
    assert await ready_pid(agent, f"{cluster.ns}/anchor") == anchor
    assert (await cluster.status("anchor"))["phase"] == "Ready"


async def test_speculative_decoding_with_a_draft_model(local_env, tiny_mlx_model):
    """The draft is its own MLX Model (here the tiny model again: same tokenizer). Missing, the
    service says so; created, the waiting service starts with it and answers."""
    cluster, agent = local_env
    await cluster.create_model("tiny-mlx", f"file://{tiny_mlx_model}", format="mlx")
    await agent.start()
    await cluster.create_isvc("spec-dec", "tiny-mlx", speculativeDecoding={
        "type": "draft", "draftModelRef": "tiny-draft", "nDraftMax": 2})
    await wait_for(lambda: _condition_says(cluster, "spec-dec", "InvalidSpec", "draftModelRef",
                                           "tiny-draft was not found"), timeout=30, what="missing draft reported")
    assert await agent.services() == []

    await cluster.create_model("tiny-draft", str(tiny_mlx_model), format="mlx")
    await cluster.wait_phase("spec-dec", "Ready", timeout=LOAD_TIMEOUT)
    rows = await agent.services()
    pid, port = rows[0]["pid"], rows[0]["port"]
    assert flag(pid, "--draft-model") == str(tiny_mlx_model) and flag(pid, "--num-draft-tokens") == "2"
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=60)) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["usage"]["completion_tokens"] >= 1


@pytest.fixture
async def hub(tiny_mlx_model):
    from tests.support.http_models import ModelHTTPServer, add_hub_repo

    server = await ModelHTTPServer().start()
    files = {p.name: p.read_bytes() for p in sorted(tiny_mlx_model.iterdir()) if p.is_file()}
    add_hub_repo(server, "org/tiny-mlx", files, lfs=("model.safetensors",),
                 per_file={"model.safetensors": {"trickle": (32 * 1024, 0.05)}})  # ~1 s of weights
    yield server
    await server.stop()


async def test_an_mlx_model_from_the_hub_shows_progress_then_serves(control_plane, admin_api, namespace,
                                                                     llama_server_bin, mlx_server_bin, hub, tmp_path):
    """hf://org/repo through the whole agent, the hub played over real HTTP (HF_ENDPOINT)."""
    cluster = Cluster(admin_api, namespace)
    agent = AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                      workdir=tmp_path, namespaces=(namespace,),
                                      env={"HF_ENDPOINT": f"http://127.0.0.1:{hub.port}"}))
    try:
        await cluster.create_model("hub-mlx", "hf://org/tiny-mlx", format="mlx")
        await agent.start()
        await cluster.create_isvc("hub-chat", "hub-mlx")
        await wait_for(lambda: _condition_says(cluster, "hub-chat", "ModelDownloading", "downloading file"),
                       timeout=30, what="download progress in status")
        await cluster.wait_phase("hub-chat", "Ready", timeout=LOAD_TIMEOUT)
        row = (await agent.services())[0]
        assert flag(row["pid"], "--model").startswith(str(tmp_path / "models"))
        async with aiohttp.ClientSession() as http:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            async with http.post(f"http://127.0.0.1:{row['port']}/v1/chat/completions", json=body,
                                 timeout=aiohttp.ClientTimeout(total=60)) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        if agent.process and agent.process.running:
            await agent.stop()
        kill_recorded_processes(tmp_path / "state")
