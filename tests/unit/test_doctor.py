"""`metal-agent doctor`: each check on its own, then the command as a user runs it.

These run on Linux: the Mac-only checks must say "skipped", never fail.
Where a check needs a Mac tool (launchctl) or llama-server, a tiny script
stands in for it; the cluster checks run against a real API server in the
integration test at the end (skipped when the control plane is not built).
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from metal_agent.cli import doctor_cluster
from metal_agent.cli.doctor import DEFAULT_POWER_INTERVAL_MS
from metal_agent.cli.doctor_base import Status
from metal_agent.cli.doctor_checks import (
    check_agent,
    check_apple_silicon,
    check_launchd,
    check_llama_server,
    check_memory,
    check_metal,
    check_sudo,
    memory_result,
)
from metal_agent.cli.doctor_cluster import check_permissions, cluster_checks
from metal_agent.cli.main import app
from metal_agent.core.permissions import AGENT_PERMISSIONS
from tests.support.ports import free_port

GiB = 2**30
linux_only = pytest.mark.skipif(platform.system() == "Darwin", reason="checks what a non-Mac reports")


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def kubeconfig(path: Path, server: str, token: str = "s3cret-token-do-not-print") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))  # fmt: skip
    return path


@linux_only
@pytest.mark.parametrize("check", [check_apple_silicon, check_metal, check_launchd, lambda: check_sudo(1000)])
async def test_mac_only_checks_are_skipped(check):
    result = await check()
    assert result.status is Status.SKIP
    assert "only on macOS" in result.detail


async def test_launchd_loaded(tmp_path: Path):
    launchctl = script(tmp_path / "launchctl", 'echo "gui/$(id -u)/com.llmkube.metal-agent = {"\n'
                       'echo "\tstate = running"\necho "\tpid = 4242"\n')
    result = await check_launchd(system="Darwin", launchctl=str(launchctl))
    assert result.status is Status.OK
    assert "state running" in result.detail and "pid 4242" in result.detail


async def test_launchd_not_loaded(tmp_path: Path):
    launchctl = script(tmp_path / "launchctl", 'echo "Could not find service" >&2\nexit 113\n')
    result = await check_launchd(system="Darwin", launchctl=str(launchctl))
    assert result.status is Status.FAIL
    assert "make install-metal-agent" in result.fix


@pytest.mark.parametrize("total,available,status,budget", [
    (64 * GiB, 40 * GiB, Status.OK, "48.0 GiB (0.75"),
    (32 * GiB, 30 * GiB, Status.OK, "21.4 GiB (0.67"),  # capped by the budget
    (16 * GiB, 1 * GiB, Status.FAIL, "10.7 GiB (0.67"),
])  # fmt: skip
def test_memory(total, available, status, budget):
    result = memory_result(total, available)
    assert result.status is status and budget in result.detail
    assert (result.fix is None) == (status is Status.OK)


async def test_memory_on_this_host():
    assert (await check_memory()).status in (Status.OK, Status.FAIL)


async def test_llama_server_missing(tmp_path: Path):
    result = await check_llama_server(str(tmp_path / "llama-server"))
    assert result.status is Status.FAIL
    assert "brew install llama.cpp" in result.fix


async def test_llama_server_version(tmp_path: Path):
    binary = script(tmp_path / "llama-server",
                    'case "$1" in --version) echo "version: 6500 (abc1234)";; *) echo "--mlock  keep the model in RAM";; esac\n')
    result = await check_llama_server(str(binary))
    assert result.status is Status.OK
    assert result.detail == f"{binary} (version 6500 (abc1234))"


async def test_kubeconfig_missing(tmp_path: Path):
    api, crds, perms, owner = await cluster_checks(str(tmp_path / "nope.yaml"), None, ())
    assert api.status is Status.FAIL and "no kubeconfig file" in api.detail and "--kubeconfig" in api.fix
    assert crds.status is perms.status is owner.status is Status.SKIP


async def test_kubeconfig_unloadable(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\n")
    api, *_ = await cluster_checks(str(bad), None, ())
    assert api.status is Status.FAIL and "cannot load" in api.detail


async def test_api_not_answering(tmp_path: Path):
    config = kubeconfig(tmp_path / "kc.yaml", f"https://127.0.0.1:{free_port()}")
    api, crds, perms, _ = await cluster_checks(str(config), None, ())
    assert api.status is Status.FAIL
    assert "no answer from https://127.0.0.1:" in api.detail
    assert "server address" in api.fix
    assert "s3cret" not in api.detail + api.fix
    assert crds.status is perms.status is Status.SKIP


async def test_agent_not_answering():
    result = await check_agent(f"127.0.0.1:{free_port()}")
    assert result.status is Status.FAIL and "metal-agent run" in result.fix


def authorizer(asked: list, denied=None):
    """A stand-in for the SelfSubjectAccessReview call: records each question, refuses `denied`."""

    async def allowed(api, perm, namespace) -> bool:
        asked.append((perm, namespace))
        return perm != denied

    return allowed


async def test_permissions_asks_exactly_the_agents_table(monkeypatch):
    """One review per table entry and scope, nothing else; a denial names the permission and why it is needed."""
    asked: list = []
    denied = next(p for p in AGENT_PERMISSIONS if p.verb == "list" and p.resource == "services")
    monkeypatch.setattr(doctor_cluster, "_allowed", authorizer(asked, denied))
    result = await check_permissions(None, ("team-a", "team-b"))
    assert sorted(asked, key=str) == sorted(((p, ns) for ns in ("team-a", "team-b") for p in AGENT_PERMISSIONS), key=str)
    assert len(set(asked)) == 2 * len(AGENT_PERMISSIONS)
    assert result.status is Status.FAIL
    assert result.detail == (f"denied (team-a, team-b): list services in team-a ({denied.why}); "
                             f"list services in team-b ({denied.why})")
    assert "kubectl apply -f manifests/rbac/metal-agent.yaml" in result.fix


async def test_permissions_without_namespaces_are_asked_cluster_wide(monkeypatch):
    asked: list = []
    monkeypatch.setattr(doctor_cluster, "_allowed", authorizer(asked))
    result = await check_permissions(None)
    assert result.status is Status.OK
    assert sorted(asked, key=str) == sorted(((p, "") for p in AGENT_PERMISSIONS), key=str)
    assert result.detail == f"all {len(AGENT_PERMISSIONS)} permissions granted (all namespaces)"


async def test_permissions_of_a_fleet_agent_include_the_leases_in_the_fleet_namespace(monkeypatch):
    from metal_agent.core.permissions import FLEET_PERMISSIONS

    asked: list = []
    denied = next(p for p in FLEET_PERMISSIONS if p.verb == "update")
    monkeypatch.setattr(doctor_cluster, "_allowed", authorizer(asked, denied))
    result = await check_permissions(None, ("team-a",), "metal-agent")
    assert sorted(asked, key=str) == sorted([*((p, "team-a") for p in AGENT_PERMISSIONS),
                                             *((p, "metal-agent") for p in FLEET_PERMISSIONS)], key=str)
    assert result.status is Status.FAIL
    assert result.detail == f"denied (team-a): update leases.coordination.k8s.io in metal-agent ({denied.why})"
    asked.clear()
    monkeypatch.setattr(doctor_cluster, "_allowed", authorizer(asked))
    result = await check_permissions(None, (), "metal-agent")
    assert result.detail == (f"all {len(AGENT_PERMISSIONS) + len(FLEET_PERMISSIONS)} permissions granted "
                             "(all namespaces; fleet Leases in metal-agent)")


def test_doctor_power_interval_default_is_the_agents():
    """Kept as a literal in the command module so `--help` need not import the sampler."""
    from metal_agent.adapters.powermetrics import DEFAULT_INTERVAL_MS

    assert DEFAULT_POWER_INTERVAL_MS == DEFAULT_INTERVAL_MS


def test_doctor_command_fails_with_bad_kubeconfig(tmp_path: Path):
    config = kubeconfig(tmp_path / "kc.yaml", f"https://127.0.0.1:{free_port()}")
    result = CliRunner().invoke(app, [
        "doctor", "--kubeconfig", str(config), "--listen", f"127.0.0.1:{free_port()}",
        "--llama-server", str(tmp_path / "none"),
    ])  # fmt: skip
    text = result.stdout
    assert result.exit_code == 1, text + result.stderr
    assert "✗ Kubernetes API: no answer from" in text
    assert "\n    fix: check the server address" in text
    assert "– CRDs: skipped" in text
    if platform.system() != "Darwin":
        assert "– Apple Silicon: skipped" in text and "– launchd job: skipped" in text
    assert "s3cret" not in text + result.stderr
    assert text.rstrip().splitlines()[-1].endswith("skipped")


@pytest.mark.integration
async def test_cluster_checks_against_real_api_server(control_plane, tmp_path: Path):
    from tests.support.controlplane import write_kubeconfig

    api, crds, perms, owner = await cluster_checks(str(control_plane.agent_kubeconfig), None, ())
    assert [api.status, crds.status, perms.status, owner.status] == [Status.OK] * 4, (api, crds, perms, owner)
    assert "all namespaces" in perms.detail
    assert "--status-mode" in owner.detail
    _, _, perms, _ = await cluster_checks(str(control_plane.agent_kubeconfig), None, ("team-a",))
    assert perms.status is Status.OK and "team-a" in perms.detail

    nobody = control_plane.pki.client("nobody", "nobody")
    config = write_kubeconfig(tmp_path / "nobody.kubeconfig", control_plane.url, control_plane.pki.ca_cert,
                              nobody.cert, nobody.key, "nobody")
    api, crds, perms, _ = await cluster_checks(str(config), None, ())
    assert api.status is Status.OK and crds.status is Status.OK  # discovery is open to every user
    assert perms.status is Status.FAIL
    assert "list inferenceservices.inference.llmkube.dev" in perms.detail and "kubectl apply" in perms.fix


def _isvc(name: str, model: str, managed: list | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "managedFields": managed or []},
            "spec": {"modelRef": model}}


def _model(name: str, status: dict | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"source": "hf://org/repo/m.gguf", "hardware": {"accelerator": "metal"}}, "status": status or {}}


def test_status_ownership_reads_the_cluster():
    from metal_agent.cli.doctor_cluster import ownership_result

    alone = ownership_result([_isvc("a", "m")], [_model("m")])
    assert alone.status is Status.OK and alone.detail.startswith("full for 1 Metal service")
    under = ownership_result([_isvc("a", "m")], [_model("m", {"phase": "Ready"})])
    assert "shared with LLMKube's controller for 1 of 1" in under.detail and "Model controller" in under.detail
    cpu = _model("c")
    cpu["spec"]["hardware"]["accelerator"] = "cpu"
    assert "no Metal InferenceService" in ownership_result([_isvc("b", "c")], [cpu]).detail
