"""The real llama-server, built by the harness, serves the generated tiny model."""

from __future__ import annotations

import aiohttp
import pytest

from tests.support.llama import LlamaServerExited, running_llama_server
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


def _argv(binary, model, port, *extra):
    return [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "256", "--threads", "1", *extra]


async def test_health_and_completion(llama_server_bin, tiny_model):
    port = free_port()
    async with running_llama_server(_argv(llama_server_bin, tiny_model, port), port=port) as server:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.base_url}/health") as resp:
                assert resp.status == 200
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            async with http.post(f"{server.base_url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                answer = await resp.json()
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] >= 1


async def test_quantized_kv_on_bad_head_dim_fails_with_stderr(llama_server_bin, tiny_model_bad_head_dim):
    port = free_port()
    argv = _argv(llama_server_bin, tiny_model_bad_head_dim, port,
                 "--flash-attn", "on", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0")
    with pytest.raises(LlamaServerExited) as exited:
        async with running_llama_server(argv, port=port):
            pass
    assert exited.value.returncode != 0
    assert "does not divide n_embd_head_k" in exited.value.stderr
