"""From LLMKube's Go agent to metal-agent, end to end: migrate, start with the translated flags, serve.

The Go agent's published job (deployment/macos in the vendored tarball)
carries the issue's flags and the test's paths; its store holds the tiny
model where the Go agent's `ensureModel` put what it downloaded
(`<store>/<Model name>/<file>`), for a Model whose source is an http URL
served by a real local server. `metal-agent migrate` runs as a process,
reading the Models through the agent's least-privilege identity. The agent
then starts with exactly the arguments of the job migrate wrote, and must
serve the model from the adopted file: the server must see no request at
all. The job's `--inference-service-allowlist` must leave another service
alone.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.http_models import ModelHTTPServer
from tests.support.isvc import Cluster
from tests.support.ports import free_port
from tests.support.wait import wait_for
from tests.unit.test_go_flags import _tar_member

pytestmark = pytest.mark.integration

MODEL_PATH = "/org/tiny/resolve/main/tiny.gguf"


@pytest.fixture
async def server():
    srv = await ModelHTTPServer().start()
    yield srv
    await srv.stop()


def go_job(namespace: str, store: Path, llama_server: Path, port: int, kubeconfig: Path, client_port: int) -> bytes:
    """The published plist, pointed at this test's cluster, binary, store and port, with the issue's flags."""
    job = plistlib.loads(_tar_member("deployment/macos/com.llmkube.metal-agent.plist").encode())
    args = job["ProgramArguments"]
    for flag, value in (("--namespace", namespace), ("--model-store", str(store)),
                        ("--llama-server", str(llama_server)), ("--port", str(port))):
        args[args.index(flag) + 1] = value
    args += ["--apple-power-enabled", "--apple-power-interval", "1s", "--inference-service-allowlist", "chat",
             "--memory-fraction", "0.9", "--eviction-enabled", "-llama-server-startup-timeout=2m", "--omlx-port", "8000",
             "-client-port", str(client_port)]
    job["EnvironmentVariables"]["KUBECONFIG"] = str(kubeconfig)  # how a Go job names its cluster
    return plistlib.dumps(job)


async def test_go_agent_job_and_store_are_migrated_and_served_without_a_download(
        control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path, server):
    url = server.add(MODEL_PATH, tiny_model.read_bytes())
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", url)
    store = tmp_path / "llmkube-models"
    (store / "tiny").mkdir(parents=True)
    go_copy = store / "tiny" / "tiny.gguf"
    shutil.copyfile(tiny_model, go_copy)

    agent = AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                      workdir=tmp_path))
    plist = tmp_path / "home" / "Library" / "LaunchAgents" / "com.llmkube.metal-agent.plist"
    plist.parent.mkdir(parents=True)
    client_port = free_port()  # the Go agent's --client-port (its default 9999 is shared by every test)
    plist.write_bytes(go_job(namespace, store, llama_server_bin, agent.port, control_plane.agent_kubeconfig,
                             client_port))
    metal_agent_bin = Path(sys.executable).parent / "metal-agent"

    migrate = subprocess.run(
        [sys.executable, "-m", "metal_agent", "migrate", "--plist", str(plist), "--agent-path", str(metal_agent_bin),
         "--model-dir", str(tmp_path / "models"), "--state-dir", str(tmp_path / "state"),
         "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, HOME=str(tmp_path / "home")))
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert f"link     {namespace}/tiny: {go_copy}" in migrate.stdout
    assert "--omlx-port=8000" in migrate.stdout  # named as ignored
    job = plistlib.loads(plist.read_bytes())
    assert job["Label"] == "com.llmkube.metal-agent" and job["ProgramArguments"][:2] == [str(metal_agent_bin), "run"]

    # Another Mac's service, there before the agent starts: decided (not ours) before "chat" exists.
    await cluster.create_isvc("other", "tiny", contextSize=256)
    agent.options.extra_args = tuple(job["ProgramArguments"][2:])  # exactly the migrated job's flags
    try:
        await agent.start()
        await wait_for(lambda: agent.metric("llmkube_metal_agent_reconciles_total", {"outcome": "ok"}),
                       timeout=30, what="the first reconcile of the other Mac's service")
        await cluster.create_isvc("chat", "tiny", contextSize=256)
        await cluster.wait_phase("chat", "Ready", timeout=120)

        assert server.requests == []  # not one request: the Go agent's download was adopted
        [row] = await agent.services()
        assert row["service"] == f"{namespace}/chat"
        argv = psutil.Process(row["pid"]).cmdline()
        served = Path(argv[argv.index("--model") + 1])
        assert served.is_relative_to(tmp_path / "models") and os.path.samefile(served, go_copy)
        assert not (await cluster.status("other")).get("conditions")  # never claimed, never written
        # Migrate left out what metal-agent ignores, so the migrated job starts without a warning about it.
        assert "ignoring flags of LLMKube's Go agent" not in agent.log_text()
        # The Go agent's client port is honoured: 127.0.0.1:PORT serves every model (the front door).
        assert f"--client-port={client_port}" in job["ProgramArguments"]
        async with aiohttp.ClientSession() as http:
            async def listed() -> list[str] | None:
                try:
                    async with http.get(f"http://127.0.0.1:{client_port}/v1/models") as resp:
                        found = [m["id"] for m in (await resp.json())["data"]] if resp.status == 200 else []
                except aiohttp.ClientError:
                    return None
                return found if found == ["chat"] else None

            await wait_for(listed, timeout=30, what="the client port listing the model")
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            async with http.post(f"http://127.0.0.1:{client_port}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
    finally:
        await agent.stop()
        kill_recorded_processes(tmp_path / "state")
