"""An older mlx-lm (0.30.5, a real PyPI wheel in a throw-away venv): the agent passes only what it accepts.

mlx-lm 0.30.5 has no `--decode-concurrency` (0.30.6), `--prompt-cache-size`,
`--prefill-step-size` (0.31.0) nor `--kv-bits` (0.32.0): handed any of them,
argparse stops the server on "unrecognized arguments" and the service would
crash-loop. The agent reads the installed server's options at start-up
(`adapters.mlx_binary.probe_dialect`), starts a plain spec without them, and
refuses, naming the mlx-lm release needed, a spec that needs one. The venv
is built by tests/support/old_mlx_lm.py (cached by version) and borrows MLX
from the test venv.
"""

from __future__ import annotations

import aiohttp
import psutil
import pytest

from tests.support import old_mlx_lm
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

LOAD_TIMEOUT = 120  # python + mlx import and load on a shared 2-core machine: seconds, generously bounded


@pytest.fixture(scope="session")
def old_mlx_server() -> str:
    try:
        return str(old_mlx_lm.ensure())
    except Exception as err:  # noqa: BLE001 - no index reachable: say what is missing
        pytest.fail(f"cannot build the mlx-lm {old_mlx_lm.OLD_VERSION} venv ({err}); run "
                    "`python tests/support/old_mlx_lm.py` where PyPI is reachable")


@pytest.fixture
async def old_env(control_plane, admin_api, namespace, llama_server_bin, tiny_mlx_model, mlx_server_bin,
                  old_mlx_server, tmp_path):
    cluster = Cluster(admin_api, namespace)
    agent = AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                      workdir=tmp_path, namespaces=(namespace,),
                                      extra_args=("--mlx-server", old_mlx_server)))
    await cluster.create_model("tiny-mlx", f"file://{tiny_mlx_model}", format="mlx")
    yield cluster, agent
    if agent.process and agent.process.running:
        await agent.stop()
    kill_recorded_processes(tmp_path / "state")


async def _refused(cluster: Cluster, name: str, *needles: str):
    cond = await cluster.condition(name, "MetalSpecAccepted")
    if cond and cond["status"] == "False" and all(n in cond["message"] for n in needles):
        return cond
    return None


async def test_an_older_mlx_lm_serves_what_it_can_and_refuses_what_it_cannot(old_env, old_mlx_server):
    cluster, agent = old_env
    await agent.start()
    await cluster.create_isvc("old-plain", "tiny-mlx", contextSize=1024)
    await cluster.create_isvc("old-slots", "tiny-mlx", parallelSlots=4)
    await cluster.create_isvc("old-kv", "tiny-mlx", cacheTypeK="q8_0", cacheTypeV="q8_0")

    await cluster.wait_phase("old-plain", "Ready", timeout=LOAD_TIMEOUT)
    [row] = [r for r in await agent.services() if r["service"] == f"{cluster.ns}/old-plain"]
    argv = psutil.Process(row["pid"]).cmdline()
    assert argv[0] == str(old_mlx_lm.venv_dir() / "bin" / "python")  # the old release's interpreter runs it
    for option in ("--decode-concurrency", "--prompt-cache-size", "--prefill-step-size", "--kv-bits"):
        assert option not in argv, argv
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{row['port']}/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=60)) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["usage"]["completion_tokens"] >= 1

    await wait_for(lambda: _refused(cluster, "old-slots", "spec.parallelSlots", "mlx-lm 0.30.6",
                                    old_mlx_lm.OLD_VERSION), timeout=30, what="parallelSlots refused")
    await wait_for(lambda: _refused(cluster, "old-kv", "spec.cacheTypeK", "mlx-lm 0.32.0",
                                    old_mlx_lm.OLD_VERSION), timeout=30, what="quantized KV cache refused")
    # Refused specs started nothing; the one that fits kept running.
    assert [r["service"] for r in await agent.services()] == [f"{cluster.ns}/old-plain"]
