"""Status writes beside LLMKube's real controller: who writes, how often, what it costs.

Runs a real etcd + kube-apiserver with LLMKube's own CRDs, LLMKube's manager
(built from the vendored source by scripts/build-llmkube.sh) and the real
agent as its least-privilege identity in a network namespace (so its
EndpointSlices carry a routable address, as on a Mac). Serves `--services`
copies of LLMKube's turboquant sample on the tiny model, then measures:

  status writes/min per service, idle      agent (APPLY, PATCH) and controller (PUT)
  status writes per service, spec change   from the change until both writers are quiet again
                                           (`--changes` rounds, averaged)
  kube-apiserver CPU seconds per minute    idle

Writes to `inferenceservices/status` are counted by the API server's own
request counter (every writer, every verb); the agent's share is its own
`status_writes_total` (its applies and its merge patches clearing LLMKube's
leftover scheduling fields), and LLMKube's controllers are the rest (the main
one updates with PUT, its SLO and gateway controllers merge-patch). Needs
root (network namespaces). Prints a table and writes bench/results/compat.json.

    .venv/bin/python bench/compat.py [--services 2] [--changes 1] [--idle-seconds 300] [--heartbeat 60]

Goals (coexistence issue): agent 0 writes idle; <= 2 agent writes per change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.control_loop import cached  # noqa: E402
from bench.goals import at_most, report, shown_only  # noqa: E402
from tests.support import netns, tiny_model  # noqa: E402
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes  # noqa: E402
from tests.support.controlplane import Binaries  # noqa: E402
from tests.support.isvc import GROUP, VERSION, Cluster  # noqa: E402
from tests.support.kube import api_client, create_namespace  # noqa: E402
from tests.support.llmkube import start_llmkube_plane, stop_llmkube_plane  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


AGENT_WRITES = "llmkube_metal_agent_status_writes_total"


async def status_writes(plane, agent: AgentProcess) -> dict[str, float]:
    """Cumulative inferenceservices/status writes: all (kube-apiserver's metrics) and the agent's."""
    agent_writes = await agent.metric(AGENT_WRITES)
    if agent_writes is None:  # renamed or gone: counting it as 0 would hand every write to LLMKube
        raise RuntimeError(f"the agent's /metrics has no {AGENT_WRITES}: cannot split the writes")
    counts = {"all": 0.0, "agent": agent_writes}
    for line in (await plane.control_plane.metrics_text()).splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="inferenceservices"' in line \
                and 'subresource="status"' in line and any(f'verb="{v}"' in line for v in ("APPLY", "PATCH", "PUT")):
            counts["all"] += float(line.rsplit(" ", 1)[1])
    return counts


def sample(plane, model_path: Path, name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((plane.sample_dir / "inferenceservice_turboquant.yaml").read_text()) if d]
    for doc in docs:
        doc["metadata"]["name"] = name
        if doc["kind"] == "Model":
            doc["spec"]["source"] = f"file://{model_path}"
        else:
            doc["spec"]["modelRef"] = name
            doc["spec"].pop("cacheTypeCustomK"), doc["spec"].pop("cacheTypeCustomV")
            doc["spec"]["cacheTypeK"] = doc["spec"]["cacheTypeV"] = "q8_0"
            doc["spec"]["contextSize"] = 2048
    return docs


async def all_ready(cluster: Cluster, names: list[str], generation: dict[str, int] | None = None) -> bool:
    for name in names:
        obj = await cluster.isvc(name)
        status = (obj or {}).get("status") or {}
        process = next((c for c in status.get("conditions") or [] if c["type"] == "MetalProcessReady"), {})
        if status.get("phase") != "Ready" or process.get("status") != "True":
            return False
        if generation and process.get("observedGeneration") != generation[name]:
            return False
    return True


async def quiet(plane, agent: AgentProcess, seconds: float) -> dict[str, float]:
    """Wait until no status write happened for `seconds`; the counts then."""
    last, since = await status_writes(plane, agent), time.monotonic()
    while time.monotonic() - since < seconds:
        await asyncio.sleep(0.5)
        now = await status_writes(plane, agent)
        if now != last:
            last, since = now, time.monotonic()
    return last


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2)
    parser.add_argument("--changes", type=int, default=1, help="spec changes per service, one round at a time")
    parser.add_argument("--idle-seconds", type=float, default=300)
    parser.add_argument("--heartbeat", type=float, default=60, help="agent --heartbeat-interval (its default)")
    args = parser.parse_args()
    if not netns.available():
        sys.exit("bench/compat.py needs root and iproute2 (network namespaces)")

    binaries = Binaries.in_dir(cached("build-controlplane.sh"))
    assets = cached("build-llmkube.sh")
    llama = cached("build-llama-server.sh")
    with tempfile.TemporaryDirectory(prefix="metal-agent-compat-") as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        model = tmp / "models" / "tiny.gguf"
        model.write_bytes(tiny_model.ensure_model(tiny_model.DEFAULT, llama.parent.parent / "models" /
                                                  "ggml-vocab-llama-spm.gguf").read_bytes())
        plane = await start_llmkube_plane(binaries, assets, tmp / "plane", tmp / "models")
        admin = await api_client(plane.admin_kubeconfig)
        agent = None
        try:
            namespace = await create_namespace(admin, prefix="compat")
            cluster = Cluster(admin, namespace)
            async with netns.network_namespace() as ns:
                forwarder, kubeconfig = await netns.kubeconfig_into(
                    ns, plane.agent_kubeconfig, tmp / "agent.kubeconfig", plane.control_plane.port)
                agent = AgentProcess(AgentOptions(
                    kubeconfig=kubeconfig, llama_server=llama, workdir=tmp / "agent", namespaces=(namespace,),
                    host_ip=ns.inner_ip, netns=ns, log_level="info",
                    extra_args=("--heartbeat-interval", str(args.heartbeat)),
                ))
                (tmp / "agent").mkdir()
                await agent.start()
                names = [f"svc{i}" for i in range(args.services)]
                for name in names:
                    for doc in sample(plane, model, name):
                        plural = "models" if doc["kind"] == "Model" else "inferenceservices"
                        await cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, doc)
                await wait_for(lambda: all_ready(cluster, names), timeout=180, what="all services Ready")
                settled = await quiet(plane, agent, 5)

                apiserver_pid = plane.control_plane.apiserver.pid
                cpu0, t0 = cpu_seconds(apiserver_pid), time.monotonic()
                await asyncio.sleep(args.idle_seconds)  # the measurement window itself
                idle = await status_writes(plane, agent)
                minutes = (time.monotonic() - t0) / 60
                cpu = (cpu_seconds(apiserver_pid) - cpu0) / minutes

                changed = idle
                for round_ in range(args.changes):
                    generations = {}
                    for name in names:  # every round a new context size: a new spec hash, a respawn
                        patched = await cluster.patch_isvc(name, {"contextSize": 4096 + 256 * round_})
                        generations[name] = patched["metadata"]["generation"]
                    await wait_for(lambda: all_ready(cluster, names, generations), timeout=180, what="respawned, Ready")
                    changed = await quiet(plane, agent, 10)
                forwarder.close()
        finally:
            if agent and agent.process and agent.process.running:
                await agent.stop()
            kill_recorded_processes(tmp / "agent" / "state")
            await admin.close()
            await stop_llmkube_plane(plane)

    per = args.services
    changes = per * args.changes

    def controller(counts: dict[str, float]) -> float:
        return counts["all"] - counts["agent"]

    result = {
        "services": per, "idle_seconds": args.idle_seconds, "heartbeat_seconds": args.heartbeat,
        "idle_agent_writes_per_min_per_service": (idle["agent"] - settled["agent"]) / minutes / per,
        "idle_controller_writes_per_min_per_service": (controller(idle) - controller(settled)) / minutes / per,
        "changes": args.changes,
        "change_agent_writes_per_service": (changed["agent"] - idle["agent"]) / changes,
        "change_controller_writes_per_service": (controller(changed) - controller(idle)) / changes,
        "apiserver_cpu_seconds_per_min_idle": cpu,
    }
    figures = [
        at_most("agent status writes/min/service, idle", result["idle_agent_writes_per_min_per_service"], 0,
                shown=f"{result['idle_agent_writes_per_min_per_service']:.2f}", goal="0"),
        shown_only("controller status writes/min/service, idle", f"{result['idle_controller_writes_per_min_per_service']:.2f}"),
        at_most("agent status writes/service, spec change", result["change_agent_writes_per_service"], 2,
                shown=f"{result['change_agent_writes_per_service']:.2f}"),
        shown_only("controller status writes/service, spec change", f"{result['change_controller_writes_per_service']:.2f}"),
        shown_only("kube-apiserver CPU s/min, idle", f"{result['apiserver_cpu_seconds_per_min_idle']:.2f}"),
    ]
    out = REPO / "bench" / "results" / "compat.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}\n")
    return report(figures)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
