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
