"""Per-engine start figures, same machine, same run: llama-server (GGUF) and mlx_lm.server (MLX).

Runs a real etcd + kube-apiserver (RBAC on) and one real agent (its
least-privilege identity), which serves the tiny GGUF with llama-server and
the tiny MLX model with mlx_lm.server (mlx[cpu] on Linux). For each engine,
`--applies` times in turn: create an InferenceService, measure, delete it
and wait for its process to exit. Prints a table and writes JSON to
bench/results/runtimes.json.

    .venv/bin/python bench/runtimes.py [--applies 10]

Figures, per engine (p50 / p95):
  apply -> exec    the InferenceService's create to its server's exec
                   (the process start time in /proc, 10 ms resolution)
  apply -> Ready   the create to the agent reporting the server Ready
                   (llama-server: /health 200; mlx_lm.server: its model
                   answered a 1-token completion), polled every 10 ms
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.control_loop import boot_clock, cached, exec_time_of_new_process, pct  # noqa: E402
from tests.support import tiny_mlx_model, tiny_model  # noqa: E402
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes  # noqa: E402
from tests.support.controlplane import Binaries, ControlPlane  # noqa: E402
from tests.support.isvc import Cluster  # noqa: E402
from tests.support.kube import api_client, create_namespace, install_metal_agent  # noqa: E402
from tests.support.procs import process_gone  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

ENGINES = (("llama-server", "tiny-gguf"), ("mlx_lm.server", "tiny-mlx"))


async def ready_at(agent: AgentProcess, key: str, timeout: float = 180) -> float:
    async def ready():
        return any(r["service"] == key and r["state"] == "Ready" for r in await agent.services())
    await wait_for(ready, timeout=timeout, what=f"{key} Ready", interval=0.01)
    return boot_clock()


async def bench_engine(cluster: Cluster, agent: AgentProcess, model: str, n: int) -> tuple[list[float], list[float]]:
    to_exec, to_ready = [], []
    for i in range(n):
        name = f"{model}-{i}"
        key = f"{cluster.ns}/{name}"
        t0 = boot_clock()
        await cluster.create_isvc(name, model, contextSize=512)
        pid, exec_at = await exec_time_of_new_process(agent, key, set(), timeout=60)
        ready = await ready_at(agent, key)
        to_exec.append((exec_at - t0) * 1000)
        to_ready.append((ready - t0) * 1000)
        await cluster.delete_isvc(name)
        await wait_for(lambda p=pid: process_gone(p), timeout=30, what="stopped", interval=0.01)
    return to_exec, to_ready


async def main() -> None:
    parser = argparse.ArgumentParser(description="per-engine start benchmark")
    parser.add_argument("--applies", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtimes.json")
    args = parser.parse_args()

    llama = cached("build-llama-server.sh")
    gguf = tiny_model.ensure_model(tiny_model.DEFAULT, llama.parent.parent / "models" / "ggml-vocab-llama-spm.gguf")
    mlx_dir = tiny_mlx_model.ensure_model()
    results: dict = {"machine": {"cpus": os.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1)},
                     "applies": args.applies}

    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        tmp = Path(tmp)
        cp = ControlPlane(Binaries.in_dir(cached("build-controlplane.sh")), tmp / "cp")
        await cp.start()
        admin = await api_client(cp.admin_kubeconfig)
        agent: AgentProcess | None = None
        try:
            await install_metal_agent(admin)
            ns = await create_namespace(admin, "bench")
            cluster = Cluster(admin, ns)
            await cluster.create_model("tiny-gguf", f"file://{gguf}")
            await cluster.create_model("tiny-mlx", f"file://{mlx_dir}", format="mlx")
            agent = AgentProcess(AgentOptions(kubeconfig=cp.agent_kubeconfig, llama_server=llama, workdir=tmp / "a",
                                              namespaces=(ns,), log_level="info"))
            await agent.start()
            for engine, model in ENGINES:
                to_exec, to_ready = await bench_engine(cluster, agent, model, args.applies)
                results[engine] = {
                    "apply_to_exec_ms": {"p50": pct(to_exec, .5), "p95": pct(to_exec, .95)},
                    "apply_to_ready_ms": {"p50": pct(to_ready, .5), "p95": pct(to_ready, .95)},
                }
        finally:
            if agent is not None:
                if agent.process and agent.process.running:
                    await agent.stop()
                kill_recorded_processes(agent.options.workdir / "state")
            await admin.close()
            await cp.stop()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{'engine':<15} {'apply -> exec p50 / p95 (ms)':>30} {'apply -> Ready p50 / p95 (ms)':>31}")
    for engine, _ in ENGINES:
        r = results[engine]
        exec_ms = f"{r['apply_to_exec_ms']['p50']:.0f} / {r['apply_to_exec_ms']['p95']:.0f}"
        ready_ms = f"{r['apply_to_ready_ms']['p50']:.0f} / {r['apply_to_ready_ms']['p95']:.0f}"
        print(f"{engine:<15} {exec_ms:>30} {ready_ms:>31}")
    print(f"\n{args.applies} applies per engine; written to {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
