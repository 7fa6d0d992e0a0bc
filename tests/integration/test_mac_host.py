"""Issue 23 through the real agent: no idle sleep while serving, the GPU's wired-memory ceiling, heat.

The agent runs as a user runs it (`metal-agent run`, real kube-apiserver,
real llama-server). caffeinate, pmset and sysctl exist only on macOS: the
agent is pointed at the stand-ins of tests/support/mac_stand_ins.py (hidden
`--caffeinate`, `--pmset`, `--sysctl`). The caffeinate stand-in refuses any
argv but `-i -w <pid>` and ends when that pid ends, as caffeinate does; pmset
replays transcribed macOS output (tests/fixtures/macos/, each file naming its
public source); sysctl answers the values a test sets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support import mac_stand_ins
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.isvc import Cluster
from tests.support.procs import process_gone
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

HELD = "llmkube_metal_agent_sleep_assertion_held"
GiB = 2**30


class Mac:
    def __init__(self, cluster: Cluster, tmp: Path, make) -> None:
        self.cluster, self.tmp, self.make = cluster, tmp, make
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.caffeinate = mac_stand_ins.caffeinate(self.bin)
        self.pmset = mac_stand_ins.pmset(self.bin)
        self.sysctl = mac_stand_ins.sysctl(self.bin, wired_limit_mb=0, memsize=64 * GiB)

    def args(self) -> tuple[str, ...]:
        return ("--caffeinate", str(self.caffeinate), "--pmset", str(self.pmset), "--sysctl", str(self.sysctl),
                "--mac-readings-interval", "0.2")

    def caffeinates(self) -> list[psutil.Process]:
        return mac_stand_ins.running_caffeinates(self.caffeinate)


@pytest.fixture
async def mac(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    agents: list[AgentProcess] = []
    box: Mac

    def make(*extra: str, env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(AgentOptions(
            kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin, workdir=tmp_path,
            namespaces=(namespace,), extra_args=(*box.args(), *extra), env=env or {}))
        agents.append(agent)
        return agent

    box = Mac(cluster, tmp_path, make)
    try:
        yield box
    finally:
        for agent in agents:
            if agent.process and agent.process.running:
                await agent.stop()
        kill_recorded_processes(tmp_path / "state")
        for proc in box.caffeinates():
            proc.kill()


def agent_pid(agent: AgentProcess) -> int:
    assert agent.process is not None
    return agent.process.pid


async def exactly_one_for(mac: Mac, agent: AgentProcess) -> psutil.Process:
    async def one():
        found = mac.caffeinates()
        return found[0] if len(found) == 1 and found[0].cmdline()[-3:] == ["-i", "-w", str(agent_pid(agent))] \
            else None
    return await wait_for(one, timeout=20, what="exactly one caffeinate -i -w <agent pid>")


async def none_left(mac: Mac) -> None:
    await wait_for(lambda: not mac.caffeinates(), timeout=20, what="no caffeinate running")


async def test_held_while_serving_released_when_nothing_serves_one_across_restarts(mac: Mac):
    agent = mac.make()
    await agent.start()
    assert await agent.metric(HELD) == 0 and mac.caffeinates() == []  # nothing serves yet

    await mac.cluster.create_isvc("chat", "tiny", contextSize=256)
    await mac.cluster.wait_phase("chat", "Ready", timeout=60)
    first = await exactly_one_for(mac, agent)
    await wait_for(lambda: _held(agent), timeout=10, what="the held gauge at 1")
    status = subprocess.run([sys.executable, "-m", "metal_agent", "status", "--listen", f"127.0.0.1:{agent.port}"],
                            capture_output=True, text=True, timeout=60)
    assert f"sleep assertion: held (caffeinate pid {first.pid}, --prevent-sleep=auto)" in status.stdout

    # A graceful restart: the assertion goes with the agent, the next one takes its own.
    await agent.stop()
    await none_left(mac)
    agent = mac.make()
    await agent.start()
    second = await exactly_one_for(mac, agent)
    assert second.pid != first.pid

    # SIGKILL: nothing of the agent runs its shutdown; caffeinate's -w ends the assertion anyway.
    agent.kill()
    await none_left(mac)
    agent = mac.make()
    await agent.start()
    await exactly_one_for(mac, agent)

    await mac.cluster.delete_isvc("chat")
    await none_left(mac)
    await wait_for(lambda: _released(agent), timeout=10, what="the held gauge at 0")
    assert "released the no-idle-sleep assertion" in agent.log_text()


async def _held(agent: AgentProcess) -> bool:
    return await agent.metric(HELD) == 1


async def _released(agent: AgentProcess) -> bool:
    return await agent.metric(HELD) == 0


async def test_a_caffeinate_left_behind_is_ended_by_the_next_agent(mac: Mac):
    # Only a caffeinate that ignores -w can outlive its agent; the stand-in can be told to.
    stubborn = {"FAKE_CAFFEINATE_IGNORE_W": "1"}
    agent = mac.make("--prevent-sleep", "always", env=stubborn)
    await agent.start()
    left = await exactly_one_for(mac, agent)
    agent.kill()
    assert not process_gone(left.pid)

    agent = mac.make("--prevent-sleep", "always", env=stubborn)
    await agent.start()
    await wait_for(lambda: process_gone(left.pid), timeout=20, what="the previous agent's caffeinate ended")
    await exactly_one_for(mac, agent)
    assert "ending the caffeinate a previous agent left" in agent.log_text()


async def test_never_holds_nothing(mac: Mac):
    agent = mac.make("--prevent-sleep", "never")
    await agent.start()
    await mac.cluster.create_isvc("chat", "tiny", contextSize=256)
    await mac.cluster.wait_phase("chat", "Ready", timeout=60)
    assert mac.caffeinates() == [] and await agent.metric(HELD) == 0


async def test_a_model_over_the_wired_ceiling_waits_until_it_is_raised(mac: Mac):
    # 128 MB: the tiny model's weights, KV cache and buffers (about 0.27 GiB) do not fit.
    mac_stand_ins.sysctl(mac.bin, wired_limit_mb=128, memsize=64 * GiB)
    agent = mac.make()
    await agent.start()
    await mac.cluster.create_isvc("chat", "tiny", contextSize=256)

    async def refused():
        status = await mac.cluster.status("chat")
        return status if status.get("schedulingStatus") == "InsufficientMemory" else None
    status = await wait_for(refused, timeout=30, what="InsufficientMemory naming the ceiling")
    message = status["schedulingMessage"]
    assert "exceeds the GPU's wired-memory ceiling of 0.12 GiB (iogpu.wired_limit_mb=128)" in message
    assert "sudo /usr/sbin/sysctl iogpu.wired_limit_mb=55296" in message  # the suggestion for 64 GiB
    assert await agent.services() == [] and await agent.metric("llmkube_metal_agent_gpu_wired_limit_bytes") == 128 * 2**20

    # The owner raises it (sudo sysctl): the waiting service starts without anything else changing.
    mac_stand_ins.sysctl(mac.bin, wired_limit_mb=8192, memsize=64 * GiB)
    status = await mac.cluster.wait_phase("chat", "Ready", timeout=60)
    assert "schedulingStatus" not in status


async def test_throttling_is_said_in_readiness_and_a_metric(mac: Mac):
    agent = mac.make()
    await agent.start()
    assert await agent.metric("llmkube_metal_agent_apple_thermal_throttled") == 0
    code, body = await agent._get("/readyz")
    assert (code, body) == (200, "ready\n")

    mac_stand_ins.pmset(mac.bin, therm="pmset-therm-intel-throttled.txt")

    async def throttled():
        code, body = await agent._get("/readyz")
        return body if code == 200 and "throttling" in body else None
    body = await wait_for(throttled, timeout=20, what="/readyz saying macOS throttles")
    assert body == "ready; macOS is throttling (CPU speed limited to 35%): tokens come slower until it cools\n"
    assert await agent.metric("llmkube_metal_agent_apple_thermal_throttled") == 1
    assert await agent.metric("llmkube_metal_agent_apple_cpu_speed_limit_percent") == 35
