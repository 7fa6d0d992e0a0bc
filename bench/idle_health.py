"""What health checking costs an idle Mac, and how fast a ready engine becomes routable (issue 21 point 6).

Real kube-apiserver + etcd, the real agent (a child process), N real llama-servers on the
tiny model, all Ready, nothing happening:

  idle CPU of the agent, and of the front door when it is on     (goal <= 0.2 % of a core, 10 services)
  engine's first /health 200 -> routable                          (goal <= 50 ms p50)
    routable: with the front door, a request held on the service's stable port is released
    to the engine (it was sent before the engine was up); without, the agent's log line
    that the service is ready is the agent's own verdict, so the figure is that log's time
    minus the first 200 this script saw polling the engine every 2 ms.

    .venv/bin/python bench/idle_health.py [--services 10] [--idle-seconds 60] [--front-door] [--profile out.prof]

--profile runs the agent under cProfile (written when it stops) to see what idle CPU is spent on.
Writes bench/results/idle_health[-front-door].json.
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

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.assets import cached  # noqa: E402
from bench.goals import at_most, report, shown_only  # noqa: E402
from tests.support import tiny_model  # noqa: E402
from tests.support.agent import AgentOptions, AgentProcess, kill_recorded_processes  # noqa: E402
from tests.support.controlplane import Binaries, ControlPlane  # noqa: E402
from tests.support.isvc import Cluster  # noqa: E402
from tests.support.kube import api_client, create_namespace, install_metal_agent  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402


class ProfiledAgent(AgentProcess):
    def __init__(self, options: AgentOptions, profile: Path | None) -> None:
        super().__init__(options)
        self.profile = profile

    def argv(self) -> list[str]:
        argv = super().argv()
        if os.environ.get("IDLE_GCWRAP"):
            return [argv[0], os.environ["IDLE_GCWRAP"], *argv[3:]]
        if self.profile is None:
            return argv
        return [argv[0], "-m", "cProfile", "-o", str(self.profile), *argv[1:]]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def front_door_of(agent_pid: int) -> psutil.Process | None:
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if "front-door" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


async def first_200(port: int, deadline: float) -> float:
    """Poll the engine's /health every 2 ms: the monotonic time of its first 200."""
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return time.monotonic()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.002)  # the polling rhythm itself
    raise TimeoutError("the engine never answered /health")


def engine_port_of(agent_pid: int, known: set[int]) -> int | None:
    """The port of a llama-server the agent started that was not there before."""
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if child.pid in known:
                continue
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].endswith("llama-server") and "--port" in cmd:
            known.add(child.pid)
            return int(cmd[cmd.index("--port") + 1])
    return None


async def routable_after(agent: AgentProcess, cluster: Cluster, name: str, front_door: bool) -> float:
    """ms from the engine's first 200 (seen by us) to routable."""
    known = {p.pid for p in psutil.Process(agent.process.pid).children(recursive=True)}
    await cluster.create_isvc(name, "tiny", contextSize=256)
    port = await wait_for(lambda: _found(engine_port_of(agent.process.pid, known)), timeout=60,
                          what="the new engine's process")
    deadline = time.monotonic() + 60
    first = asyncio.ensure_future(first_200(port, deadline))
    if front_door:
        stable = await wait_for(lambda: _stable_port(agent, name), timeout=60, what="the stable port")
        released = await held_request(stable)
        t0 = await first
        return (released - t0) * 1000
    t0 = await first
    ready = await wait_for(lambda: _ready_logged(agent, name), timeout=60, what="the agent's ready line")
    return (ready - t0) * 1000


async def gone(cluster: Cluster, agent: AgentProcess, name: str, before: set[int]) -> None:
    """Delete a timed service and wait for its engine to exit (the memory budget fits 10 + 1)."""
    await cluster.delete_isvc(name)

    async def engines_back() -> bool:
        now = {p.pid for p in psutil.Process(agent.process.pid).children(recursive=True)
               if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
        return now <= before
    await wait_for(engines_back, timeout=30, what=f"{name}'s engine to stop")


async def held_request(port: int) -> float:
    """GET /health on the stable port, sent while the engine loads: the monotonic time its answer
    came (the front door held it until the route was routable). The listener opens with the
    table that names the route: until then the connect is refused and simply tried again."""
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=60)) as r:
                    assert r.status == 200, r.status
                    return time.monotonic()
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.001)  # the listener is not open yet


async def _found(value):
    return value


async def _stable_port(agent: AgentProcess, name: str) -> int | None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{agent.url}/v1/services", timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return None
            for row in (await r.json()).get("routes", []):
                if row["service"].endswith("/" + name):
                    return row["port"]
    return None


async def _ready_logged(agent: AgentProcess, name: str) -> float | None:
    for line in agent.process.log_path.read_text(errors="replace").splitlines():
        if '"llama-server ready"' in line and f"/{name}" in line:
            record = json.loads(line)
            wall = record.get("timestamp")
            if wall:
                from datetime import datetime
                ts = datetime.fromisoformat(wall.replace("Z", "+00:00")).timestamp()
                return time.monotonic() - (time.time() - ts)
    return None


async def main() -> int:
    parser = argparse.ArgumentParser(description="idle health-check cost")
    parser.add_argument("--services", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--front-door", action="store_true")
    parser.add_argument("--starts", type=int, default=5, help="new services timed from first 200 to routable")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--keep-logs", type=Path, help="copy the agent's logs here before clean-up")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    out = REPO / "bench" / "results" / f"idle_health{'-front-door' if args.front_door else ''}.json"

    llama = cached("build-llama-server.sh")
    model = tiny_model.ensure_model(tiny_model.DEFAULT, llama.parent.parent / "models" / "ggml-vocab-llama-spm.gguf")
    results: dict = {"services": args.services, "front_door": args.front_door, "idle_seconds": args.idle_seconds}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        cp = ControlPlane(Binaries.in_dir(cached("build-controlplane.sh")), tmp / "cp")
        await cp.start()
        admin = await api_client(cp.admin_kubeconfig)
        agent = None
        try:
            await install_metal_agent(admin)
            ns = await create_namespace(admin, "idle")
            cluster = Cluster(admin, ns)
            await cluster.create_model("tiny", f"file://{model}")
            for i in range(args.services):
                await cluster.create_isvc(f"s-{i}", "tiny", contextSize=256)
            extra = ("--front-door", "--client-port", "0") if args.front_door else ()
            agent = ProfiledAgent(AgentOptions(kubeconfig=cp.agent_kubeconfig, llama_server=llama,
                                               workdir=tmp / "a", namespaces=(ns,), extra_args=extra,
                                               log_level=args.log_level), args.profile)
            await agent.start()
            for i in range(args.services):
                await cluster.wait_phase(f"s-{i}", "Ready", timeout=180)
            await asyncio.sleep(5)  # settle: start-up writes and first probes are not idle
            agent_proc = psutil.Process(agent.process.pid)
            door = front_door_of(agent.process.pid)
            t0, a0 = time.monotonic(), cpu_seconds([agent_proc])
            d0 = cpu_seconds([door]) if door else 0.0
            if os.environ.get("GCSTATS"):
                print("gc at idle start", Path(os.environ["GCSTATS"]).read_text(), flush=True)
            threads0 = {t.id: t.user_time + t.system_time for t in agent_proc.threads()}
            split0, switches0 = agent_proc.cpu_times(), agent_proc.num_ctx_switches()
            await asyncio.sleep(args.idle_seconds)  # the idle window measured
            elapsed = time.monotonic() - t0
            if os.environ.get("GCSTATS"):
                print("gc at idle end", Path(os.environ["GCSTATS"]).read_text(), flush=True)
            if os.environ.get("IDLE_THREADS"):
                busy = {t.id: round(t.user_time + t.system_time - threads0.get(t.id, 0.0), 3)
                        for t in agent_proc.threads()}
                split1, switches1 = agent_proc.cpu_times(), agent_proc.num_ctx_switches()
                print("agent user/system s:", round(split1.user - split0.user, 3), round(split1.system - split0.system, 3),
                      "ctx switches vol/invol:", switches1.voluntary - switches0.voluntary,
                      switches1.involuntary - switches0.involuntary, flush=True)
                print("agent threads cpu s:", {k: v for k, v in busy.items() if v}, "main", agent_proc.pid,
                      flush=True)
            results["agent_idle_cpu_percent_of_core"] = round(100 * (cpu_seconds([agent_proc]) - a0) / elapsed, 3)
            if door:
                results["front_door_idle_cpu_percent_of_core"] = round(
                    100 * (cpu_seconds([door]) - d0) / elapsed, 3)
            print(json.dumps(results), flush=True)
            delays = []
            before = {p.pid for p in psutil.Process(agent.process.pid).children(recursive=True)}
            for i in range(args.starts):
                delays.append(await routable_after(agent, cluster, f"new-{i}", args.front_door))
                await gone(cluster, agent, f"new-{i}", before)
            delays.sort()
            results["first_200_to_routable_ms"] = {"n": len(delays), "p50": round(delays[len(delays) // 2], 1),
                                                   "max": round(delays[-1], 1), "all": [round(d, 1) for d in delays]}
        except BaseException:
            if agent is not None:
                print(agent.process.tail() if agent.process else "", file=sys.stderr)
            raise
        finally:
            door = front_door_of(agent.process.pid) if agent is not None and agent.process and \
                agent.process.running else None
            if agent is not None and agent.process and agent.process.running:
                await agent.stop()
            if door is not None:  # the agent leaves it serving on purpose (restarts drop no request)
                door.terminate()
                psutil.wait_procs([door], timeout=10)
            if args.keep_logs and agent is not None:
                import shutil
                shutil.copytree(agent.options.workdir, args.keep_logs, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock", "models"))
            if agent is not None:
                kill_recorded_processes(agent.options.workdir / "state")
            await admin.close()
            await cp.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    figures = [at_most("agent idle CPU (% of a core)", results["agent_idle_cpu_percent_of_core"], 0.2),
               at_most("first /health 200 -> routable p50 (ms)", results["first_200_to_routable_ms"]["p50"], 50)]
    if "front_door_idle_cpu_percent_of_core" in results:
        figures.append(shown_only("front door idle CPU (% of a core)", results["front_door_idle_cpu_percent_of_core"]))
    print(f"written to {out}\n")
    return report(figures)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
