"""Faults in the work itself, with the cluster watching: downloads, memory, eviction.

The same "Mac" as tests/integration/test_faults.py (the agent in a network
namespace, its EndpointSlices carrying a routable address, the API server
behind Toxiproxy) and the same truths, checked by a prober that reads the
slices and asks their endpoints every 100 ms:

- no EndpointSlice says ready for an endpoint that does not answer for
  longer than about a second (issue 12, item 1: a stopped model must not
  stay announced while its replacement downloads, waits for memory, or after
  an eviction);
- no needless llama-server restart; the agent never exits;
- afterwards everything converges (slices, status, records, /readyz).

Model files come over real HTTP from tests/support/http_models.py, forwarded
into the namespace. Memory pressure comes from a readings file the agent
re-reads at every check (`--memory-readings-file`): the one fake here,
because a shared test machine cannot be pushed to critical memory on cue and
the kernel's own pressure level exists only on macOS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.support import netns
from tests.support.http_models import ModelHTTPServer
from tests.support.isvc import Cluster
from tests.support.memory_file import MemoryFile
from tests.support.procs import process_gone
from tests.support.slowness import scaled
from tests.support.toxiproxy import faulty_mac
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

# --no-front-door: as in test_faults.py, the slice probers measure how long a slice names a dead
# engine port, which behind the front door (the default) cannot happen.
AGENT_FLAGS = ("--no-front-door", "--liveness-interval", "0.5", "--liveness-failures", "2", "--heartbeat-interval", "1",
               "--eviction-enabled", "--memory-interval", "0.5")


def dead_ready_limit() -> float:
    """Seconds a slice may say ready for an endpoint that does not answer: 1 on an idle machine."""
    return scaled(1.0)


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path, toxic_api):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    (tmp_path / "mac").mkdir()
    memory = MemoryFile(tmp_path / "memory.json")
    flags = (*AGENT_FLAGS, "--memory-readings-file", str(memory.path))
    server = await ModelHTTPServer().start()
    async with faulty_mac(cluster, toxic_api.proxy, toxic_api.kubeconfig, tmp_path / "mac", llama_server_bin,
                          agent_flags=flags) as rig:
        forwarder, inner_port = await netns.forward_into(rig.ns, server.port)
        rig.memory = memory
        rig.models = server
        rig.inner_url = lambda path: f"http://127.0.0.1:{inner_port}{path}"
        try:
            yield rig
        finally:
            forwarder.close()
            await server.stop()
            for prober in rig.probers:  # shown with the test's output (-rP, or on failure)
                print(f"slice prober:\n{prober.describe()}")


def served_model(pid: int) -> str:
    argv = psutil.Process(pid).cmdline()
    return argv[argv.index("--model") + 1]


async def test_a_spec_change_to_a_model_that_must_download_keeps_serving_until_it_is_there(mac, tiny_model):
    """Make before break: the running llama-server serves the previous spec (and stays
    announced, truthfully) for as long as the new model downloads; then one respawn."""
    gate = asyncio.Event()
    mac.models.add("/models/next.gguf", tiny_model.read_bytes(), gate=gate)
    await mac.cluster.create_model("next", mac.inner_url("/models/next.gguf"))
    agent, pids = await mac.serve("moving", "bystander")
    async with mac.probe(["moving", "bystander"]) as probe:
        await mac.cluster.patch_isvc("moving", {"modelRef": "next"})

        async def downloading():
            cond = await mac.cluster.condition("moving", "Progressing")
            return cond if cond and cond["reason"] == "ModelDownloading" else None
        await wait_for(downloading, timeout=30, what="the rollout to say the new model downloads")
        await mac.cluster.wait_event("moving", "RespawnDeferred")
        ready = await mac.cluster.condition("moving", "MetalProcessReady")
        assert ready["status"] == "True" and "previous spec" in ready["message"]
        assert (await mac.cluster.status("moving"))["phase"] == "Ready"
        assert await mac.ready_pid(agent, "moving") == pids["moving"]  # still the same process, still serving
        # The prober must have looked while the new model downloads (and, below, after the
        # respawn), whatever the machine's load lets it sample: it vouches for both states.
        await probe.wait_sampled(since=time.monotonic())

        gate.set()
        new = await wait_for(lambda: mac.ready_pid(agent, "moving", other_than=pids["moving"]), timeout=60,
                             what="the respawn on the downloaded model", on_timeout=agent.process.tail)
        await mac.wait_converged(agent, ["moving", "bystander"])
        await probe.wait_sampled(since=time.monotonic())
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    assert Path(served_model(new)).is_relative_to(mac.workdir / "models")  # the downloaded file, not the old one
    assert (await mac.pids(agent))["bystander"] == pids["bystander"]
    assert await mac.restarts(agent, "moving") == 0  # a respawn for the spec, not a crash restart
    assert (await mac.cluster.condition("moving", "Progressing") or {}).get("status") != "True"


async def test_the_agent_killed_during_a_download_resumes_it(mac, tiny_model):
    """SIGKILL mid-download: the next agent resumes the partial file (a Range request), serves
    the service, and nothing else restarts."""
    data = tiny_model.read_bytes()
    mac.models.add("/models/far.gguf", data, trickle=(max(1, len(data) // 100), 0.05))  # ~5 s
    await mac.cluster.create_model("far", mac.inner_url("/models/far.gguf"))
    agent, pids = await mac.serve("bystander")
    async with mac.probe(["bystander", "fetching"]) as probe:
        await mac.cluster.create_isvc("fetching", "far", contextSize=256)

        def partial_bytes() -> int:
            return sum(p.stat().st_size for p in (mac.workdir / "models").rglob("far.gguf.partial"))
        await wait_for(lambda: partial_bytes() > len(data) // 10, timeout=30, interval=0.02,
                       what="part of the download on disk")
        agent.kill()
        await agent.process.wait(timeout=10)
        after_kill = partial_bytes()
        assert 0 < after_kill < len(data)
        await probe.wait_sampled(since=time.monotonic())  # looked while no agent runs

        agent = mac.agent()
        await agent.start()
        await mac.wait_converged(agent, ["bystander", "fetching"])
        await probe.wait_sampled(since=time.monotonic())  # and at the next agent's result
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    ranges = [seen.range for seen in mac.models.requests_for("/models/far.gguf")]
    resumed_from = [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges[1:] if r]
    assert resumed_from and resumed_from[0] > 0, ranges  # picked up where the killed agent stopped
    assert (await mac.pids(agent))["bystander"] == pids["bystander"]
    assert not list((mac.workdir / "models").rglob("far.gguf.partial*"))

    # Once more: the next agent takes the process over while it re-verifies the downloaded
    # file, and then counts its memory against what others may start.
    served = (await mac.pids(agent))["fetching"]
    agent.kill()
    await agent.process.wait(timeout=10)
    agent = mac.agent()
    await agent.start()
    await mac.wait_converged(agent, ["bystander", "fetching"])
    assert (await mac.pids(agent))["fetching"] == served
    labels = {"name": "fetching", "namespace": mac.cluster.ns}
    await wait_for(lambda: agent.metric("llmkube_metal_agent_memory_estimated_bytes", labels), timeout=30,
                   what="the taken-over process counted in memory admission")


async def test_a_service_waiting_for_memory_is_not_announced_and_starts_when_memory_frees(mac, tiny_model):
    """Admission refuses the third service that does not fit its Model's budget: it waits,
    with no ready endpoint, and starts once another one is deleted."""
    agent, pids = await mac.serve("anchor")
    each = await agent.metric("llmkube_metal_agent_memory_estimated_bytes", {"name": "anchor", "namespace": mac.cluster.ns})
    assert each and each > 0
    await mac.cluster.create_model("tight", f"file://{tiny_model}",
                                   hardware={"accelerator": "metal", "memoryBudget": str(int(2.5 * each))})
    await mac.cluster.create_isvc("first", "tight", contextSize=256)
    await mac.wait_converged(agent, ["anchor", "first"])
    async with mac.probe(["anchor", "first", "waiting"]) as probe:
        await mac.cluster.create_isvc("waiting", "tight", contextSize=256)

        async def refused():
            cond = await mac.cluster.condition("waiting", "MetalProcessReady")
            return cond if cond and cond["reason"] == "InsufficientMemory" else None
        cond = await wait_for(refused, timeout=30, what="the service to wait for memory")
        assert "budget" in cond["message"]
        await mac.cluster.wait_event("waiting", "InsufficientMemory")
        assert "waiting" not in await mac.pids(agent)
        await probe.wait_sampled(since=time.monotonic())  # looked while it waits

        await mac.cluster.delete_isvc("first")
        await mac.wait_converged(agent, ["anchor", "waiting"])
        await probe.wait_sampled(since=time.monotonic())  # and once it started
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    assert (await mac.pids(agent))["anchor"] == pids["anchor"]


async def test_an_eviction_withdraws_the_endpoint_before_the_process_stops(mac):
    """Critical pressure that our services make evicts the lowest-priority one through its own reconcile: its
    slice is marked not ready first, the other service is untouched, and it comes back when
    pressure is Normal again."""
    agent = mac.agent()
    await agent.start()
    await mac.cluster.create_isvc("batch-job", "tiny", contextSize=256, priority="batch")
    await mac.cluster.create_isvc("vip", "tiny", contextSize=256, priority="high")
    await mac.wait_converged(agent, ["batch-job", "vip"])
    pids = await mac.pids(agent)
    async with mac.probe(["batch-job", "vip"]) as probe:
        mac.memory.critical_from_ours(list(pids.values()))  # Critical, and our services hold most of it

        async def evicted():
            cond = await mac.cluster.condition("batch-job", "MemoryPressure")
            return cond if cond and cond["reason"] == "Evicted" else None
        await wait_for(evicted, timeout=30, what="batch-job evicted")
        await wait_for(lambda: process_gone(pids["batch-job"]), timeout=30, what="the evicted process to stop")
        assert await mac.ready_pid(agent, "vip") == pids["vip"]
        await mac.cluster.wait_event("batch-job", "Evicted")
        await probe.wait_sampled(since=time.monotonic())  # looked while it is evicted

        mac.memory.set(0.5)  # Normal again
        await mac.wait_converged(agent, ["batch-job", "vip"])
        await probe.wait_sampled(since=time.monotonic())  # and once it is back
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    after = await mac.pids(agent)
    assert after["vip"] == pids["vip"] and after["batch-job"] != pids["batch-job"]
    assert agent.process.running


async def test_a_download_that_fails_after_a_spec_change_keeps_the_previous_spec_serving(mac, tiny_model):
    """A changed spec whose model cannot be had (404) is a problem with the spec, not a reason to
    stop the running model: it keeps serving, and the condition says why."""
    await mac.cluster.create_model("gone", mac.inner_url("/models/missing.gguf"))
    agent, pids = await mac.serve("steady")
    async with mac.probe(["steady"]) as probe:
        await mac.cluster.patch_isvc("steady", {"modelRef": "gone"})

        async def refused():
            cond = await mac.cluster.condition("steady", "MetalSpecAccepted")
            return cond if cond and cond["status"] == "False" and "previous spec" in cond["message"] else None
        cond = await wait_for(refused, timeout=30, what="the failed download in MetalSpecAccepted")
        assert "404" in cond["message"]
        assert await mac.ready_pid(agent, "steady") == pids["steady"]
        assert not process_gone(pids["steady"])
        os.kill(pids["steady"], 0)
        await probe.wait_sampled(since=time.monotonic())  # the prober looked at the refused, still serving state
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    assert probe.wrong_seconds() <= dead_ready_limit(), probe.describe()


async def test_sigterm_mid_download_exits_promptly_and_the_next_agent_resumes(mac, tiny_model):
    """Shutdown does not wait for a download: the agent exits within seconds, the partial
    file stays, and the next agent resumes it rather than starting over."""
    data = tiny_model.read_bytes()
    mac.models.add("/models/slow.gguf", data, trickle=(max(1, len(data) // 200), 0.05))  # ~10 s
    await mac.cluster.create_model("slow", mac.inner_url("/models/slow.gguf"))
    agent = mac.agent()
    await agent.start()
    await mac.cluster.create_isvc("fetching", "slow", contextSize=256)

    def partial_bytes() -> int:
        return sum(p.stat().st_size for p in (mac.workdir / "models").rglob("slow.gguf.partial"))
    await wait_for(lambda: partial_bytes() > 0, timeout=30, interval=0.02, what="the download under way")
    agent.process.signal(signal.SIGTERM)
    assert await agent.process.wait(timeout=15) == 0, agent.process.tail()
    kept = partial_bytes()
    assert 0 < kept < len(data)
    assert mac.llama_servers() == set(mac.recorded().values())

    agent = mac.agent()
    await agent.start()
    await mac.wait_converged(agent, ["fetching"])
    ranges = [seen.range for seen in mac.models.requests_for("/models/slow.gguf")]
    assert any(r and int(r.removeprefix("bytes=").rstrip("-")) > 0 for r in ranges[1:]), ranges
