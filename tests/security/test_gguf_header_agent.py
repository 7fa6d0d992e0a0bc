"""Hostile GGUF headers against the whole agent (real API server, real llama-server).

A namespace user who can point a Model at a file (here file://, as a
download would leave it in the cache) hands the agent bytes to parse on
every reconcile. Before the bounded parser, each of these headers cost the
agent ~10 s of CPU per estimate (issue 20: a 64 KiB key named in a
description string for each of 20,000 nested arrays), so three of them kept
every reconcile worker busy. Now each is refused by its service's status
with the reason, nothing is spawned for it, and an honest service beside
them is served as quickly as alone.
"""

from __future__ import annotations

import pytest

from tests.support import gguf_forge as f
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def issue_20_header(seed: int) -> bytes:
    """The issue's attack (a NUL-byte 64 KiB key over 20,000 nested arrays), without the keys an
    estimate needs: so it is refused by its numbers once parsed, and never reaches llama-server."""
    key = bytes([seed]) + b"\0" * 65_534
    return f.header([f.kv(key, f.ARRAY, f.array_head(f.ARRAY, 20_000) + f.array_head(f.U8, 0) * 20_000)])


async def test_hostile_headers_are_refused_by_reason_and_an_honest_service_is_not_delayed(
        control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path):
    cluster = Cluster(admin_api, namespace)
    hostile = {
        "issue-a": (issue_20_header(1), "no general.architecture"),
        "issue-b": (issue_20_header(2), "no general.architecture"),
        "issue-c": (issue_20_header(3), "no general.architecture"),
        "nested": (f.deep_nesting(8 << 20), "arrays inside arrays"),
        "strings": (f.empty_strings(64 << 20), "walked items"),
        "layers": (f.header(f.llama_header(layers=4_000_000_000)) + bytes(4096), "layers"),
    }
    for name, (data, _) in hostile.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        await cluster.create_model(name, f"file://{tmp_path / name}.gguf")
    await cluster.create_model("honest", f"file://{tiny_model}")

    agent = AgentProcess(AgentOptions(kubeconfig=control_plane.agent_kubeconfig, llama_server=llama_server_bin,
                                      workdir=tmp_path, namespaces=(namespace,)))
    await agent.start()
    try:
        for name in hostile:
            await cluster.create_isvc(name, name, contextSize=256)
        await cluster.create_isvc("honest", "honest", contextSize=256)
        await cluster.wait_phase("honest", "Ready", timeout=30)

        for name, (_, reason) in hostile.items():
            async def refused(name=name):
                status = await cluster.status(name)
                return status if status.get("schedulingStatus") == "MemoryCheckFailed" else None
            status = await wait_for(refused, timeout=30, what=f"{name} refused with MemoryCheckFailed")
            assert reason in status["schedulingMessage"], (name, status["schedulingMessage"])
            assert len(status["schedulingMessage"]) < 600  # a 64 KiB key is not copied into the status
            assert status["phase"] == "Failed"
        served = [row["service"] for row in await agent.services()]
        assert served == [f"{namespace}/honest"], served  # nothing spawned for them
    finally:
        await agent.stop()
        kill_recorded_processes(tmp_path / "state")
