"""`Model.spec.files` / `spec.mmproj` through the whole agent (real API server, real llama-server, real HTTP).

The split GGUF is the tiny model written in two parts by the gguf package's
writer (tests/support/tiny_model.py `ensure_split_model`, llama.cpp's split
layout); llama-server is started from the first part and must find the second
beside it, so a chat answer proves the whole set landed where it belongs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.http_models import ModelHTTPServer
from tests.support import tiny_mmproj
from tests.support.isvc import GROUP, MERGE_PATCH, VERSION, Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(control_plane, admin_api, namespace, llama_server_bin, tmp_path):
    cluster = Cluster(admin_api, namespace)
    agent = AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                      workdir=tmp_path, namespaces=(namespace,)))
    server = await ModelHTTPServer().start()
    try:
        yield cluster, agent, server
    finally:
        if agent.process and agent.process.running:
            await agent.stop()
        await server.stop()
        kill_recorded_processes(tmp_path / "state")


def served_argv(rows: list[dict], key: str) -> list[str]:
    [row] = [r for r in rows if r["service"] == key]
    return psutil.Process(row["pid"]).cmdline()


async def chat(port: int) -> dict:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=60)) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def test_a_split_gguf_is_fetched_whole_and_served_from_its_first_part(env, tiny_split_model):
    cluster, agent, server = env
    names = [f"Q/{p.name}" for p in tiny_split_model]
    first, second = (p.read_bytes() for p in tiny_split_model)
    # The first part holds the big tensors (17 MB); cut mid-way, it is resumed like a one-file model.
    server.add(f"/repo/{names[0]}", first, drop_after=[len(first) // 2])
    server.add(f"/repo/{names[1]}", second)
    await cluster.create_model("split", server.url("/repo"), files=names,
                               sha256=hashlib.sha256(first).hexdigest())
    await agent.start()
    await cluster.create_isvc("split-chat", "split", contextSize=256)
    await cluster.wait_phase("split-chat", "Ready", timeout=60)

    rows = await agent.services()
    argv = served_argv(rows, f"{cluster.ns}/split-chat")
    model = Path(argv[argv.index("--model") + 1])
    assert model.name == tiny_split_model[0].name and model.parent.name == "Q"
    assert (model.parent / tiny_split_model[1].name).read_bytes() == second  # beside it, whole
    assert "--mmproj" not in argv
    ranges = [seen.range for seen in server.requests_for(f"/repo/{names[0]}")]
    assert ranges[0] is None and ranges[1] and ranges[1].startswith("bytes=")
    assert (await chat(rows[0]["port"]))["usage"]["completion_tokens"] >= 1


async def _blocked(cluster: Cluster, name: str, *needles: str):
    status = await cluster.status(name)
    text = " ".join(c.get("message", "") for c in status.get("conditions", []))
    return status if all(n in text for n in needles) else None


async def test_a_missing_projector_is_named_then_served_with_mmproj(env, tiny_split_model, tmp_path):
    """A local set (`file://` directory) whose mmproj is not there: the service says which file and
    starts nothing; once the file is there (and the Model touched, as an edit would), it starts with
    `--mmproj` and llama-server loads the projector: its /props says it sees images."""
    cluster, agent, _ = env
    directory = tmp_path / "set"
    directory.mkdir()
    for part in tiny_split_model:
        (directory / part.name).symlink_to(part)
    await cluster.create_model("local-set", f"file://{directory}", files=[p.name for p in tiny_split_model],
                               mmproj="proj/mmproj.gguf")
    await agent.start()
    await cluster.create_isvc("vision", "local-set", contextSize=256)
    await wait_for(lambda: _blocked(cluster, "vision", "proj/mmproj.gguf", "does not exist"), timeout=30,
                   what="missing mmproj reported")
    assert await agent.services() == []

    (directory / "proj").mkdir()
    (directory / "proj" / "mmproj.gguf").symlink_to(tiny_mmproj.ensure_mmproj())
    await cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.ns, "models", "local-set",
                                                        {"metadata": {"annotations": {"touched": "1"}}},
                                                        _content_type=MERGE_PATCH)
    await cluster.wait_phase("vision", "Ready", timeout=60)
    rows = await agent.services()
    argv = served_argv(rows, f"{cluster.ns}/vision")
    assert argv[argv.index("--mmproj") + 1] == str(directory / "proj" / "mmproj.gguf")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{rows[0]['port']}/props") as resp:
            assert (await resp.json())["modalities"]["vision"] is True
    assert (await chat(rows[0]["port"]))["usage"]["completion_tokens"] >= 1


async def test_a_set_from_the_hub_is_fetched_from_its_resolve_urls(control_plane, admin_api, namespace,
                                                                  llama_server_bin, tiny_split_model, tmp_path):
    """`hf://org/repo` with files: each file from `<HF_ENDPOINT>/org/repo/resolve/main/<name>`, as
    LLMKube's init container fetches them (the hub played over real HTTP); the projector too."""
    server = await ModelHTTPServer().start()
    names = [f"Q4/{p.name}" for p in tiny_split_model]
    for name, part in zip(names, tiny_split_model):
        server.add(f"/org/tiny-gguf/resolve/main/{name}", part.read_bytes())
    server.add("/org/tiny-gguf/resolve/main/mmproj-F32.gguf", tiny_mmproj.ensure_mmproj().read_bytes())
    cluster = Cluster(admin_api, namespace)
    agent = AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                      workdir=tmp_path, namespaces=(namespace,),
                                      env={"HF_ENDPOINT": f"http://127.0.0.1:{server.port}"}))
    try:
        await cluster.create_model("hub-set", "hf://org/tiny-gguf", files=names, mmproj="mmproj-F32.gguf")
        await agent.start()
        await cluster.create_isvc("hub-vision", "hub-set", contextSize=256)
        await cluster.wait_phase("hub-vision", "Ready", timeout=60)
        rows = await agent.services()
        argv = served_argv(rows, f"{cluster.ns}/hub-vision")
        model, mmproj = Path(argv[argv.index("--model") + 1]), Path(argv[argv.index("--mmproj") + 1])
        assert model.relative_to(tmp_path / "models").parts[1:] == ("Q4", tiny_split_model[0].name)
        assert mmproj == model.parent.parent / "mmproj-F32.gguf"  # one directory per repository
        assert (await chat(rows[0]["port"]))["usage"]["completion_tokens"] >= 1
    finally:
        if agent.process and agent.process.running:
            await agent.stop()
        await server.stop()
        kill_recorded_processes(tmp_path / "state")
