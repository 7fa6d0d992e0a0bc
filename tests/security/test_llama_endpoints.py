"""What a client of the model's port can reach: the real llama-server, started with the command
line the agent emits (benign extraArgs included), must not expose prompts in flight (/slots),
let anyone change server settings (POST /props), proxy requests (/cors-proxy) or show a file's
contents (GET /props). The file-reading variant is first shown refused before it could start."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from metal_agent.core.argv import build_argv
from metal_agent.core.claim import evaluate
from metal_agent.core.launch import Instance, LaunchSettings
from metal_agent.core.result import Invalid
from tests.support.http_models import ModelHTTPServer
from tests.support.llama import running_llama_server
from tests.support.manifests import isvc_doc, model_doc, workload
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

SECRET_TEXT = "-----BEGIN OPENSSH PRIVATE KEY----- metal-agent-test-secret"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_text(SECRET_TEXT + "\n")
    return path


async def test_the_agents_llama_server_offers_no_endpoint_beyond_the_model(llama_server_bin, tiny_model, secret):
    # The attack first: the template-file read never reaches a command line.
    attack = evaluate(isvc_doc(extraArgs=["--chat-template-file", str(secret)]), model_doc())
    assert isinstance(attack, Invalid) and attack.errors[0].reason == "ExtraArgRefused"

    port = free_port()
    argv = build_argv(workload({"contextSize": 256, "extraArgs": ["--top-k", "40", "--temp=0.7"]}),
                      LaunchSettings(llama_server=str(llama_server_bin), host="127.0.0.1", threads=2, mlock=False),
                      Instance(model_path=str(tiny_model), port=port))
    assert "--no-slots" in argv and "--props" not in argv and "--temp" in argv
    target = await ModelHTTPServer().start()  # what a /cors-proxy would be made to reach on the Mac
    try:
        async with running_llama_server(argv, port=port) as server, aiohttp.ClientSession() as http:
            async with http.get(f"{server.base_url}/slots") as r:
                slots = await r.text()
                assert r.status >= 400, slots  # "This server does not support slots endpoint"
            async with http.get(f"{server.base_url}/props") as r:
                assert r.status == 200
                before = await r.json()
            async with http.post(f"{server.base_url}/props", json={"n_threads": 1, "slot_save_path": "/tmp"}) as r:
                assert r.status >= 400, await r.text()
            async with http.get(f"{server.base_url}/props") as r:
                after = await r.json()
                props_text = await r.text()
            assert after == before
            assert SECRET_TEXT not in props_text and str(secret) not in props_text
            assert after.get("endpoint_slots") is False and after.get("endpoint_props") is False
            proxied = target.url("/loopback-secret")
            for method in ("get", "post"):
                async with http.request(method, f"{server.base_url}/cors-proxy", params={"url": proxied}) as r:
                    assert r.status in (403, 404), await r.text()
            assert target.requests_for("/loopback-secret") == []  # nothing was sent on the Mac's loopback
    finally:
        await target.stop()
