"""The argv builder's output, run by the real llama-server on a tiny real model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from metal_agent.core.argv import AgentArgvOptions, build_argv
from metal_agent.core.flags import MlockStyle, mlock_style_from_help
from tests.support.llama import LlamaServerExited, running_llama_server
from tests.support.manifests import gpu, workload
from tests.support.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def help_text(llama_server_bin: Path) -> str:
    result = subprocess.run(
        [str(llama_server_bin), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def mlock_style(help_text: str) -> MlockStyle:
    return mlock_style_from_help(help_text)


def options(binary: Path, model: Path, port: int, style: MlockStyle) -> AgentArgvOptions:
    return AgentArgvOptions(
        binary=str(binary), model_path=str(model), host="127.0.0.1", port=port, threads=2, mlock_style=style
    )


def test_every_flag_the_builder_emits_is_known_to_this_build(help_text, mlock_style):
    # One spec that switches on every flag-producing field at once.
    everything = workload(
        {
            "contextSize": 4096,
            "ropeScaling": {"type": "yarn", "factor": "2", "originalContext": 2048},
            "parallelSlots": 2,
            "jinja": True,
            "cacheTypeK": "q8_0",
            "cacheTypeV": "q8_0",
            "moeCPUOffload": True,
            "moeCPULayers": 1,
            "noKvOffload": True,
            "noWarmup": True,
            "reasoningBudget": 10,
            "reasoningBudgetMessage": "done",
            "metadataOverrides": ["a=int:1"],
            "tensorOverrides": ["exps=CPU"],
            "uBatchSize": 64,
            "mode": "rerank",
        },
        hardware=gpu(layers=2, count=1, sharding={"strategy": "layer", "layerSplit": ["1"]}),
    )
    argv = build_argv(everything, AgentArgvOptions("llama-server", "m.gguf", "127.0.0.1", 1, 2, mlock_style=mlock_style))
    flags = {arg for arg in argv[1:] if re.fullmatch(r"--[a-z][a-z-]*", arg)}
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))
    assert flags - known == set()
    assert len(flags) >= 30


CASES = [
    pytest.param({}, id="defaults"),
    pytest.param({"cacheTypeK": "q8_0", "cacheTypeV": "q8_0", "flashAttention": True}, id="kv-q8_0"),
    pytest.param({"cacheTypeK": "q4_0", "cacheTypeV": "q4_0", "flashAttention": True}, id="kv-q4_0"),
    pytest.param({"parallelSlots": 4, "contextSize": 4096}, id="parallel-4"),
    pytest.param({"batchSize": 256, "uBatchSize": 64}, id="batch-ubatch"),
    pytest.param({"jinja": True}, id="jinja"),
    pytest.param({"flashAttention": False}, id="flash-attention-off"),
    pytest.param({"noWarmup": True, "metadataOverrides": ["general.name=str:tiny"]}, id="no-warmup-override-kv"),
    pytest.param({"mode": "embedding"}, id="embedding"),
]


@pytest.mark.parametrize("isvc_spec", CASES)
async def test_llama_server_serves_the_built_argv(isvc_spec, llama_server_bin, tiny_model, mlock_style):
    spec = workload(isvc_spec)
    port = free_port()
    argv = build_argv(spec, options(llama_server_bin, tiny_model, port, mlock_style))

    async with running_llama_server(list(argv), port=port) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.base_url}/health") as resp:
            assert resp.status == 200
        async with http.get(f"{server.base_url}/props") as resp:
            props = await resp.json()
        context, slots = spec.isvc.spec.context_size, spec.isvc.spec.parallel_slots
        if slots > 1:
            # --parallel N splits --ctx-size into N slots.
            assert (props["total_slots"], props["default_generation_settings"]["n_ctx"]) == (slots, context // slots)
        else:
            # No --parallel: the build picks its slot count over one unified cache
            # of --ctx-size, so each request can still use the whole context.
            assert props["default_generation_settings"]["n_ctx"] == context
        assert props["endpoint_metrics"] is True
        async with http.get(f"{server.base_url}/metrics") as resp:
            assert resp.status == 200
        if spec.isvc.spec.mode == "embedding":
            async with http.post(f"{server.base_url}/v1/embeddings", json={"input": "hello"}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            assert len(body["data"][0]["embedding"]) == 64  # n_embd of the tiny model


async def test_custom_cache_type_unknown_to_the_build_stops_llama_server(llama_server_bin, tiny_model, mlock_style):
    port = free_port()
    argv = build_argv(
        workload({"cacheTypeCustomK": "turbo3", "cacheTypeCustomV": "turbo3"}),
        options(llama_server_bin, tiny_model, port, mlock_style),
    )
    with pytest.raises(LlamaServerExited) as exited:
        async with running_llama_server(list(argv), port=port, startup_timeout=30):
            pytest.fail("llama-server became healthy with a cache type it does not have")
    assert exited.value.returncode != 0
    assert re.search(r'error while handling argument "--cache-type-k": Unsupported cache type: turbo3', exited.value.stderr)


def test_render_speaks_the_dialect_of_the_given_binary(llama_server_bin, mlock_style):
    manifest = Path(__file__).resolve().parent.parent / "fixtures" / "manifests" / "turboquant.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "metal_agent", "render", "-f", str(manifest), "--threads", "2",
         "--llama-server", str(llama_server_bin)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[0] == str(llama_server_bin)
    style_args = list(mlock_style.args())
    assert any(argv[i : i + len(style_args)] == style_args for i in range(len(argv)))
