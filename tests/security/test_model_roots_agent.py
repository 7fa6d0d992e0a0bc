"""The real agent (real kube-apiserver, agent identity under RBAC) refuses Model sources outside
its --allowed-model-roots: MetalSpecAccepted=False/SourceNotAllowed naming the roots, an Event,
no llama-server, and the file never read (its access time, set before its modification time so
relatime records a read, is unchanged). Also: a refused extraArgs option, end to end."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.isvc import Cluster
from tests.support.procs import process_gone
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def _trap(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    os.utime(dest, (1, time.time()))
    return dest


@pytest.fixture
async def refusing(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    outside = _trap(tiny_model, tmp_path / "private" / "model.gguf")
    agent = AgentProcess(AgentOptions(
        kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin, workdir=tmp_path,
        namespaces=(namespace,), model_roots=(str(root),)))
    await agent.start()
    yield Cluster(admin_api, namespace), agent, root, outside
    await agent.stop()
    kill_recorded_processes(tmp_path / "state")


async def _refused(cluster: Cluster, name: str, reason: str) -> dict:
    async def check():
        c = await cluster.condition(name, "MetalSpecAccepted")
        return c if c and c["status"] == "False" and c["reason"] == reason else None
    return await wait_for(check, timeout=60, what=f"MetalSpecAccepted=False/{reason}")


@pytest.mark.parametrize("variant", ["outside", "symlink-in-root"])
async def test_agent_refuses_a_source_outside_its_roots(refusing, variant):
    cluster, agent, root, outside = refusing
    source = outside
    if variant == "symlink-in-root":
        source = root / "model.gguf"
        source.symlink_to(outside)
    await cluster.create_model("escape", f"file://{source}")
    await cluster.create_isvc("escape", "escape", contextSize=256)
    cond = await _refused(cluster, "escape", "SourceNotAllowed")
    assert str(root) in cond["message"] and "Model" in cond["message"]
    await cluster.wait_event("escape", "SourceNotAllowed")
    assert await agent.services() == []
    assert os.stat(outside).st_atime == 1, "the refused model file was read"
    assert "SourceNotAllowed" in agent.log_text() and "escape" in agent.log_text()


async def test_agent_refuses_a_file_reading_extra_arg(refusing, tiny_model):
    cluster, agent, root, outside = refusing
    inside = _trap(tiny_model, root / "model.gguf")
    secret = _trap(tiny_model, outside.parent / "id_ed25519")
    await cluster.create_model("tmpl", f"file://{inside}")
    await cluster.create_isvc("tmpl", "tmpl", contextSize=256, extraArgs=["--chat_template_file", str(secret)])
    cond = await _refused(cluster, "tmpl", "ExtraArgRefused")
    assert "--chat_template_file" in cond["message"] and "--chat-template-file" in cond["message"]
    await cluster.wait_event("tmpl", "ExtraArgRefused")
    assert await agent.services() == []
    assert os.stat(secret).st_atime == 1


async def test_a_narrower_policy_after_a_restart_stops_the_process_it_finds(control_plane, admin_api, namespace,
                                                                             llama_server_bin, tiny_model, tmp_path):
    """The upgrade case: the previous agent (here: a wider --allowed-model-roots) left a llama-server
    serving a source the new agent refuses. The user changed nothing, but keeping it is the hole:
    the new agent stops it and says why."""
    cluster = Cluster(admin_api, namespace)
    root, outside = tmp_path / "allowed", tmp_path / "private" / "model.gguf"
    root.mkdir()
    _trap(tiny_model, outside)

    def agent(roots) -> AgentProcess:
        return AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                         workdir=tmp_path, namespaces=(namespace,), model_roots=roots))
    wide = agent((str(root), str(outside.parent)))
    try:
        await wide.start()
        await cluster.create_model("legacy", f"file://{outside}")
        await cluster.create_isvc("legacy", "legacy", contextSize=256)
        await cluster.wait_phase("legacy", "Ready", timeout=120)
        (row,) = await wide.services()
        pid = row["pid"]
        wide.kill()
        await wide.process.wait(timeout=10)
        assert not process_gone(pid)  # left running for the next agent, as always

        narrow = agent((str(root),))
        await narrow.start()
        try:
            cond = await _refused(cluster, "legacy", "SourceNotAllowed")
            assert str(root) in cond["message"]
            await wait_for(lambda: process_gone(pid), timeout=30, what="the refused llama-server stopped")
            assert await narrow.services() == []
            assert "stopping a process this agent did not start" in narrow.log_text()
        finally:
            await narrow.stop()
    finally:
        if wide.process and wide.process.running:
            await wide.stop()
        kill_recorded_processes(tmp_path / "state")
