"""The llama-swap that `make dev` builds (scripts/build-llama-swap.sh) is a working one.

bench/front_door.py sets the front door beside llama-swap (issue 21); a comparison with a binary that
does not start, or that answers without reaching the engine, would be worthless. So: the cached build
starts, loads a model on the first request for it (the real llama-server, the tiny GGUF) and proxies
that request, and lists it as running.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_swap_bin() -> Path:
    found = subprocess.run(["bash", str(REPO / "scripts" / "build-llama-swap.sh")], capture_output=True, text=True,
                           env=dict(os.environ, METAL_AGENT_NO_BUILD="1"), check=False)
    if found.returncode == 4:
        pytest.skip("no llama-swap source (../shared/vendor/llama-swap-*.tar.gz): only developers and CI have it")
    path = Path(found.stdout.strip()) / "llama-swap"
    if found.returncode != 0 or not os.access(path, os.X_OK):
        message = "llama-swap is not built: run `make dev` (scripts/build-llama-swap.sh)"
        if os.environ.get("METAL_AGENT_REQUIRE_ASSETS") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


async def _ok(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_the_built_llama_swap_starts_a_model_on_demand_and_proxies_to_it(
        llama_swap_bin, llama_server_bin, tiny_model, tmp_path):
    engine, listen = free_port(), free_port()
    argv = [str(llama_server_bin), "--model", str(tiny_model), "--host", "127.0.0.1", "--port", str(engine),
            "--ctx-size", "256", "--threads", "1"]
    config = {"healthCheckTimeout": 60, "models": {"tiny": {"cmd": " ".join(argv), "proxy": f"http://127.0.0.1:{engine}"}}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # YAML is a superset of JSON
    swap = ManagedProcess("llama-swap", [str(llama_swap_bin), "-config", str(tmp_path / "config.yaml"),
                                        "-listen", f"127.0.0.1:{listen}"], tmp_path / "llama-swap.log")
    await swap.start()
    children: list[psutil.Process] = []
    base = f"http://127.0.0.1:{listen}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            await wait_for(lambda: _ok(http, f"{base}/health"), timeout=30, what="llama-swap's /health",
                           on_timeout=swap.tail)
            assert not await _ok(http, f"http://127.0.0.1:{engine}/health")  # nothing loaded yet
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with http.post(f"{base}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
            children = psutil.Process(swap.pid).children(recursive=True)
            assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] >= 1
            assert await _ok(http, f"http://127.0.0.1:{engine}/health")  # the engine it started answered
            async with http.get(f"{base}/running") as resp:
                assert [m["model"] for m in (await resp.json())["running"]] == ["tiny"]
    finally:
        await swap.stop(grace=10)
        for child in children:  # its engines run in process groups of their own
            if child.is_running():  # psutil compares the start time too: this process, not a reused pid
                child.kill()
