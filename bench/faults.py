"""Real faults against an agent serving 10 services: what each one costs.

Runs a real etcd + kube-apiserver (RBAC on), Toxiproxy between the agent and
the API server (scripts/build-toxiproxy.sh), and the real agent as its
least-privilege identity in a network namespace (so its EndpointSlices carry
a reachable address), serving `--services` llama-servers on the tiny model,
with the agent's default settings. Then, one after another, each fault, and
for each:

  restarts     llama-server processes started because of it (new pids of the
               existing services), and how many of those were needless
               (beyond the ones the fault itself asked for: the process it
               killed or froze, the respawn its spec change asked for, the one
               whose record it destroyed)
  wrong-ready  seconds a slice said ready while its endpoint did not answer
               /health, or not ready while it did, summed over services (a
               prober checks every 100 ms), with the longest stretch
  converge     seconds from the end of the fault until everything is true again:
               /readyz 200, every service Ready in status and in its slice on the
               right port, every llama-server recorded and supervised, and a
               service created during the fault (where the API was reachable to
               the bench) served
  agent exits  times the agent process ended without being asked to (each is
               restarted at once, as launchd would)

Durations are the issue's (API blackholed 15 min, resets and latency 60 s),
times --scale. Needs root (network namespaces; tmpfs for the full-disk fault).
Prints a table and writes bench/results/faults.json.

    .venv/bin/python bench/faults.py [--scale 0.1] [--services 10] [--only blackhole,latency]

Goal for every row (issue 12): 0 needless restarts, no wrong-ready stretch
beyond 1 s, converged within 5 s after the fault ends, 0 agent exits. Exits 1
if any row misses one (each miss is listed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.control_loop import cached  # noqa: E402
from tests.support import netns, tiny_model  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.controlplane import Binaries, ControlPlane  # noqa: E402
from tests.support.http_models import ModelHTTPServer  # noqa: E402
from tests.support.isvc import Cluster  # noqa: E402
from tests.support.memory_file import MemoryFile  # noqa: E402
from tests.support.kube import api_client, create_namespace, install_metal_agent  # noqa: E402
from tests.support.procs import process_gone  # noqa: E402
from tests.support.toxiproxy import (FaultyMac, ProberBlind, ToxiproxyServer, faulty_mac,  # noqa: E402
                                    fill_filesystem, kubeconfig_via)
from tests.support.wait import wait_for  # noqa: E402

CONVERGE_LIMIT = 300.0  # give up measuring convergence after this long


@dataclass
class Row:
    fault: str
    restarts: int = 0
    needless_restarts: int = 0
    wrong_ready_s: float = 0.0
    longest_wrong_s: float = 0.0
    dead_ready_s: float = 0.0  # of wrong_ready_s: ready while the endpoint did not answer
    converge_s: float | None = None  # None: not converged within CONVERGE_LIMIT
    agent_exits: int = 0
    prober_blind: bool = False  # the prober saw too little: the wrong-ready figures mean nothing
    notes: list[str] = field(default_factory=list)
    started: dict[int, str] = field(default_factory=dict)  # llama-server pids started meanwhile -> service


class ProcessStarts:
    """Every llama-server pid of the "Mac" seen, sampled every 100 ms."""

    def __init__(self, mac: FaultyMac) -> None:
        self.mac = mac
        self.seen: set[int] = set()
        self.owner: dict[int, str] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.mark()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.mark()
            await asyncio.sleep(0.1)

    def mark(self) -> set[int]:
        for pid in self.mac.llama_servers() - self.seen:
            self.seen.add(pid)
            with contextlib.suppress(psutil.Error, ValueError):  # --ctx-size and port tell which service
                argv = psutil.Process(pid).cmdline()
                self.owner[pid] = f"port {argv[argv.index('--port') + 1]} ctx {argv[argv.index('--ctx-size') + 1]}"
        return set(self.seen)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class FaultBench:
    def __init__(self, mac: FaultyMac, cp: ControlPlane, services: list[str], scale: float, log_dir_tmpfs: bool,
                 models: ModelHTTPServer, model_url: Callable[[str], str], memory: MemoryFile, model: Path) -> None:
        self.mac = mac
        self.models = models  # real HTTP, forwarded into the Mac's namespace
        self.model_url = model_url
        self.memory = memory
        self.model = model
        self.cp = cp
        self.services = services
        self.scale = scale
        self.log_dir_tmpfs = log_dir_tmpfs
        self.agent: AgentProcess | None = None
        self.exits = 0
        self.expect_exit = False
        self.extra: list[str] = []  # services created during a fault, still to serve
        self.starts = ProcessStarts(mac)
        self.prober = mac.probe(services)
        self._watch: asyncio.Task | None = None
        self._late = 0
        self.orphans: set[int] = set()
        self.transient = 0  # services a fault created and deleted again (their first start is no restart)

    # -- the agent, kept running as launchd would ------------------------------

    async def start_agent(self) -> AgentProcess:
        self.agent = self.mac.agent()
        await self.agent.start(wait_ready=False)
        return self.agent

    async def _watch_agent(self) -> None:
        while True:
            agent = self.agent
            if agent is not None and agent.process is not None and not agent.process.running and not self.expect_exit:
                self.exits += 1
                print(f"   agent exited unasked (code {agent.process.proc.returncode}); restarting it", flush=True)
                await asyncio.sleep(1)  # launchd waits too before restarting a job that exited
                await self.start_agent()
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def agent_may_exit(self):
        self.expect_exit = True
        try:
            yield
        finally:
            self.expect_exit = False

    async def begin(self) -> None:
        await self.start_agent()
        await self.mac.create(*self.services)
        await self.mac.wait_converged(self.agent, self.services, converge_timeout=180, interval=0.2)
        self._watch = asyncio.create_task(self._watch_agent())
        self.starts.start()
        self.prober.start()

    async def end(self) -> None:
        if self._watch:
            self._watch.cancel()
        await self.starts.stop()
        await self.prober.stop()

    # -- helpers for the faults --------------------------------------------------

    async def pids(self) -> dict[str, int]:
        return await self.mac.pids(self.agent)

    async def ready_pid(self, name: str, other_than: int | None = None) -> int | None:
        try:
            return await self.mac.ready_pid(self.agent, name, other_than)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):  # the agent is (re)starting
            return None

    async def late(self) -> str:
        """Create a service the agent must pick up once the fault is over."""
        self._late += 1
        name = f"late-{self._late}"
        await self.mac.create(name)
        self.add_extra(name)
        return name

    def add_extra(self, name: str) -> None:
        """A service the fault created: served at convergence, probed meanwhile, deleted after."""
        self.extra.append(name)
        self.prober.watch(name)

    async def hold(self, began: float, seconds: float) -> None:
        remaining = seconds - (time.monotonic() - began)
        if remaining > 0:
            await asyncio.sleep(remaining)  # the fault's own duration

    async def converged(self) -> bool:
        try:
            return await self.mac.converged(self.agent, self.services + self.extra, ignore=self.orphans)
        except Exception:  # noqa: BLE001 - an agent restarting, an API server starting: not yet
            return False

    async def wait_converged(self, row: Row, limit: float = CONVERGE_LIMIT) -> float | None:
        """Seconds until converged. A llama-server that stays unsupervised and unrecorded for
        2 s is an orphan: noted, left out, and stopped by the bench afterwards (as an operator
        would have to)."""
        started = time.monotonic()
        suspects: dict[int, float] = {}
        while time.monotonic() - started < limit:
            if await self.converged():
                return time.monotonic() - started
            now = time.monotonic()
            suspects = {pid: suspects.get(pid, now) for pid in self.mac.orphans}
            for pid, since in suspects.items():
                if now - since >= 2.0 and pid not in self.orphans:
                    self.orphans.add(pid)
                    row.notes.append(f"orphan llama-server {pid}: running, neither recorded nor supervised")
            await asyncio.sleep(0.1)
        return None

    async def drop_extra(self) -> None:
        for name in self.extra:
            with contextlib.suppress(Exception):
                await self.mac.cluster.delete_isvc(name)
        for name in set(self.prober.services) - set(self.services):
            self.prober.unwatch(name)
        self.extra = []
        with contextlib.suppress(TimeoutError):
            await self.mac.wait_converged(self.agent, self.services, converge_timeout=60, interval=0.2)

    async def measure(self, name: str, expected: int, fault: Callable[[Row], Awaitable[None]]) -> Row:
        """Run `fault` (which returns when the fault has ended) and measure what it cost."""
        row = Row(name)
        print(f">> {name}", flush=True)
        self.prober.reset()
        before = self.starts.mark()
        exits = self.exits
        new_services = len(self.extra)
        try:
            await fault(row)
        except Exception as err:  # noqa: BLE001 - recorded in the row, then the bench recovers
            row.notes.append(f"fault did not run as planned: {type(err).__name__}: {err}")
            await self.recover()
        converge = await self.wait_converged(row)
        row.converge_s = None if converge is None else round(converge, 2)
        if converge is None:
            row.notes.append(f"not converged after {CONVERGE_LIMIT:.0f}s: {self.mac.why}")
        new_services = len(self.extra) - new_services + self.transient
        self.transient = 0
        started = self.starts.mark() - before
        row.restarts = len(started) - new_services
        row.started = {pid: self.starts.owner.get(pid, "?") for pid in sorted(started)}
        row.needless_restarts = max(0, row.restarts - expected)
        try:
            row.wrong_ready_s = round(self.prober.wrong_seconds(), 2)
            row.longest_wrong_s = round(self.prober.longest_wrong(), 2)
        except ProberBlind as err:  # zeros from a prober that did not look are no figures
            row.prober_blind = True
            row.notes.append(str(err).splitlines()[0])
        row.dead_ready_s = round(sum(t.dead_seconds for t in self.prober.truth.values()), 2)
        row.agent_exits = self.exits - exits
        print(f"   {row}", flush=True)
        for pid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.orphans = set()
        await self.drop_extra()
        return row

    async def recover(self) -> None:
        with contextlib.suppress(Exception):
            await self.mac.proxy.clear()
        if not self.cp.apiserver.running:
            await self.cp.start_apiserver()
        if self.agent is None or not self.agent.process.running:
            await self.start_agent()

    def log_dir(self) -> Path:
        return self.mac.workdir / "logs"

    # -- the faults -----------------------------------------------------------------

    async def blackhole(self, row: Row) -> None:
        seconds = 900 * self.scale
        row.fault = f"API blackholed {seconds:g}s, a llama-server killed meanwhile"
        victim = self.services[0]
        async with self.mac.proxy.fault("blackhole"):
            began = time.monotonic()
            await self.late()
            await asyncio.sleep(seconds / 3)  # part of the outage's own duration
            pid = (await self.pids())[victim]
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda: self.ready_pid(victim, other_than=pid), timeout=60,
                           what="local restart during the blackhole")
            await self.hold(began, seconds)

    async def reset_peer(self, row: Row) -> None:
        seconds = 60 * self.scale
        row.fault = f"every connection reset for {seconds:g}s"
        async with self.mac.proxy.fault("reset_peer"):
            began = time.monotonic()
            await self.late()
            await self.hold(began, seconds)

    async def latency(self, row: Row) -> None:
        seconds = 60 * self.scale
        row.fault = f"2 s ± 0.5 s latency for {seconds:g}s"
        async with self.mac.proxy.fault("latency", 2000, 500):
            began = time.monotonic()
            await self.late()
            await self.hold(began, seconds)

    async def watch_cut(self, row: Row) -> None:
        row.fault = "watch cut mid-event (limit_data), spec change in it"
        failures = await self._watch_failures()
        async with self.mac.proxy.fault("limit_data", 512):
            await self.mac.cluster.patch_isvc(self.services[1], {"contextSize": 512})
            await wait_for(lambda: self._watch_failed_since(failures), timeout=60, what="the watch to be cut")

    async def _watch_failures(self) -> float:
        return await self.agent.metric("llmkube_metal_agent_watch_failures_total", {"resource": "inferenceservices"}) or 0

    async def _watch_failed_since(self, failures: float) -> bool:
        return await self._watch_failures() > failures

    async def apiserver_restart(self, row: Row) -> None:
        row.fault = "kube-apiserver restarted (410 on every watch)"
        await self.cp.stop_apiserver()
        await self.cp.start_apiserver()

    async def kill_agent_during_spawn(self, row: Row) -> None:
        row.fault = "agent SIGKILL during a spawn (between exec and record)"
        known = self.mac.llama_servers()
        await self.late()
        async with self.agent_may_exit():
            caught = await asyncio.to_thread(self.mac.kill_agent_between_exec_and_record, self.agent, known)
            if not caught:
                row.notes.append("missed the exec-to-record window: killed just after the record")
            await self.agent.process.wait(timeout=10)
            await self.start_agent()

    async def kill_agent_during_respawn(self, row: Row) -> None:
        row.fault = "agent SIGKILL during a respawn (old process stopped)"
        name = self.services[2]
        pids = await self.pids()
        await self.mac.cluster.patch_isvc(name, {"contextSize": 512})
        await wait_for(lambda: process_gone(pids[name]), timeout=60, interval=0.002, what="the respawn to begin")
        async with self.agent_may_exit():
            await asyncio.to_thread(self.mac.kill_agent_outside_the_record_window, self.agent, set(pids.values()))
            await self.agent.process.wait(timeout=10)
            await self.start_agent()

    async def sigterm_mid_reconcile(self, row: Row) -> None:
        row.fault = "agent SIGTERM mid-reconcile (3 respawns in flight)"
        names = self.services[3:6]
        pids = await self.pids()
        for name in names:
            await self.mac.cluster.patch_isvc(name, {"contextSize": 512})
        await wait_for(lambda: any(process_gone(pids[n]) for n in names), timeout=60, interval=0.002,
                       what="a respawn to begin")
        async with self.agent_may_exit():
            asked = time.monotonic()
            self.agent.process.signal(signal.SIGTERM)
            code = await self.agent.process.wait(timeout=120)
            row.notes.append(f"shutdown took {time.monotonic() - asked:.1f}s (exit {code})")
            unrecorded = self.mac.llama_servers() - set(self.mac.recorded().values())
            if unrecorded:
                row.notes.append(f"unrecorded llama-servers left: {sorted(unrecorded)}")
            await self.start_agent()

    async def sigstop(self, row: Row) -> None:
        row.fault = "a llama-server stops answering (SIGSTOP)"
        name = self.services[6]
        pid = (await self.pids())[name]
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: process_gone(pid), timeout=120, what="liveness to replace it")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    async def corrupted_record(self, row: Row) -> None:
        row.fault = "corrupted record file (agent restarted)"
        name = self.services[7]
        pid = (await self.pids())[name]
        async with self.agent_may_exit():
            self.agent.kill()
            await self.agent.process.wait(timeout=10)
            record = self.mac.state_dir / "processes" / f"{self.mac.cluster.ns}__{name}.json"
            record.write_text(record.read_text()[:40])
            await self.start_agent()
        await wait_for(lambda: self.ready_pid(name, other_than=pid), timeout=120,
                       what="a process for the service whose record is gone")
        if not process_gone(pid):
            row.notes.append(f"unprovable llama-server {pid} left running (never signalled); the bench stops it")
            os.kill(pid, signal.SIGKILL)

    async def full_log_dir(self, row: Row) -> None:
        seconds = 60 * self.scale
        row.fault = f"log directory full for {seconds:g}s (a kill, a respawn)"
        if not self.log_dir_tmpfs:
            raise RuntimeError("the log directory is not a tmpfs (needs root and mount)")
        filler = self.log_dir() / "filler"
        began = time.monotonic()
        fill_filesystem(self.log_dir())
        try:
            pids = await self.pids()
            victim, changed = self.services[8], self.services[9]
            os.kill(pids[victim], signal.SIGKILL)
            await self.mac.cluster.patch_isvc(changed, {"contextSize": 512})
            await self.hold(began, seconds)
        finally:
            filler.unlink()

    def _remote_model(self, name: str, seconds: float, **behaviour) -> str:
        """The tiny model served over HTTP at about `seconds` for the whole file."""
        data = self.model.read_bytes()
        steps = max(1, int(seconds / 0.05))
        self.models.add(f"/models/{name}.gguf", data, trickle=(max(1, len(data) // steps), 0.05), **behaviour)
        return self.model_url(f"/models/{name}.gguf")

    async def download_respawn(self, row: Row) -> None:
        seconds = 60 * self.scale
        row.fault = f"spec change to a model that downloads for {seconds:g}s"
        name = self.services[0]
        await self.mac.cluster.create_model(f"dl-{name}", self._remote_model(f"dl-{name}", seconds))
        pid = (await self.pids())[name]
        await self.mac.cluster.patch_isvc(name, {"modelRef": f"dl-{name}"})
        await wait_for(lambda: self.ready_pid(name, other_than=pid), timeout=seconds * 3 + 60,
                       what="the respawn on the downloaded model")

    async def kill_agent_during_download(self, row: Row) -> None:
        seconds = 20 * self.scale
        row.fault = f"agent SIGKILL during a download ({seconds:g}s file)"
        name = f"late-dl-{self._late}"
        self._late += 1
        await self.mac.cluster.create_model(name, self._remote_model(name, seconds))
        await self.mac.cluster.create_isvc(name, name, contextSize=256)
        self.add_extra(name)
        size = self.model.stat().st_size

        def partial() -> int:
            return sum(p.stat().st_size for p in (self.mac.workdir / "models").rglob(f"{name}.gguf.partial"))
        await wait_for(lambda: partial() > size // 5, timeout=60, interval=0.02, what="part of the download on disk")
        async with self.agent_may_exit():
            self.agent.kill()
            await self.agent.process.wait(timeout=10)
            row.notes.append(f"killed with {partial() * 100 // size}% on disk")
            await self.start_agent()

    async def memory_wait(self, row: Row) -> None:
        row.fault = "a service waits for memory, then another is deleted"
        estimates = [await self.agent.metric("llmkube_metal_agent_memory_estimated_bytes",
                                             {"name": name, "namespace": self.mac.cluster.ns})
                     for name in self.services + self.extra]
        if None in estimates:
            raise RuntimeError(f"a running service's memory is not counted: {estimates}")
        each, committed = max(estimates), sum(estimates)  # what the agent's admission counts
        row.notes.append(f"budget {committed + 1.5 * each:.0f} B: {len(estimates)} running × ~{each:.0f} B + 1.5 more")
        await self.mac.cluster.create_model("tight", f"file://{self.model}",
                                            hardware={"accelerator": "metal", "memoryBudget": str(int(committed + 1.5 * each))})
        await self.mac.cluster.create_isvc("fits", "tight", contextSize=256)
        self.prober.watch("fits")  # probed while it lives; deleted by the fault itself
        self.transient += 1
        await wait_for(lambda: self.ready_pid("fits"), timeout=60, what="the first service of the tight Model")
        await self.mac.cluster.create_isvc("waits", "tight", contextSize=256)
        self.add_extra("waits")

        async def waiting() -> bool:
            cond = await self.mac.cluster.condition("waits", "MetalProcessReady")
            return bool(cond and cond["reason"] == "InsufficientMemory")
        await wait_for(waiting, timeout=60, what="the second service to wait for memory")
        await self.mac.cluster.delete_isvc("fits")

    async def eviction(self, row: Row) -> None:
        row.fault = "critical memory pressure evicts a batch service"
        name = "batch"
        await self.mac.cluster.create_isvc(name, "tiny", contextSize=256, priority="batch")
        self.add_extra(name)
        pid = await wait_for(lambda: self.ready_pid(name), timeout=60, what="the batch service ready")
        # Critical, with our services holding most of the memory in use: pressure from other
        # processes would be refused (the friendly-fire guard), which is not this fault.
        self.memory.critical_from_ours([pid])
        try:
            await wait_for(lambda: process_gone(pid), timeout=60, what="the eviction")
        finally:
            self.memory.set(0.5)
        # The fault ends when the agent sees Normal pressure again (it reads memory every
        # --memory-interval, 5 s by default): from there on the service must come back.
        await wait_for(self._pressure_normal, timeout=60, what="Normal pressure read by the agent")
        row.notes.append("converge counted from the watchdog's first Normal reading (every --memory-interval)")

    async def _pressure_normal(self) -> bool:
        return await self.agent.metric("llmkube_metal_agent_memory_pressure_level") == 0


FAULTS = {  # name -> (method, restarts the fault itself asks for)
    "blackhole": ("blackhole", 1),
    "reset": ("reset_peer", 0),
    "latency": ("latency", 0),
    "watch-cut": ("watch_cut", 1),
    "apiserver-restart": ("apiserver_restart", 0),
    "kill-agent-spawn": ("kill_agent_during_spawn", 0),
    "kill-agent-respawn": ("kill_agent_during_respawn", 1),
    "sigterm": ("sigterm_mid_reconcile", 3),
    "sigstop": ("sigstop", 1),
    "corrupted-record": ("corrupted_record", 1),
    "full-log-dir": ("full_log_dir", 2),
    "download-respawn": ("download_respawn", 1),
    "kill-agent-download": ("kill_agent_during_download", 0),
    "memory-wait": ("memory_wait", 0),
    "eviction": ("eviction", 1),
}


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False).returncode == 0


# The goal for every row (the module docstring; issue 12).
WRONG_READY_GOAL_S = 1.0
CONVERGE_GOAL_S = 5.0


def missed(row: Row) -> list[str]:
    """The goals `row` misses, each said in a few words; empty when it meets them all."""
    misses = [note for note in row.notes if note.startswith("fault did not run as planned")]
    if row.needless_restarts:
        misses.append(f"{row.needless_restarts} needless restart(s)")
    if row.prober_blind:
        misses.append("wrong-ready not measured (the prober saw too little)")
    elif row.longest_wrong_s > WRONG_READY_GOAL_S:
        misses.append(f"wrong-ready stretch {row.longest_wrong_s:.1f} s > {WRONG_READY_GOAL_S:g} s")
    if row.converge_s is None or row.converge_s > CONVERGE_GOAL_S:
        misses.append("not converged" if row.converge_s is None else
                      f"converged in {row.converge_s:.1f} s > {CONVERGE_GOAL_S:g} s")
    if row.agent_exits:
        misses.append(f"{row.agent_exits} agent exit(s)")
    return misses


def table(rows: list[Row]) -> str:
    head = ("fault", "restarts (needless)", "wrong-ready s (longest)", "converge s", "agent exits")
    lines = [(r.fault, f"{r.restarts} ({r.needless_restarts})", f"{r.wrong_ready_s:.1f} ({r.longest_wrong_s:.1f})",
              "-" if r.converge_s is None else f"{r.converge_s:.1f}", str(r.agent_exits)) for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join(out)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the issue's fault durations (0.1: 90 s blackhole)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(FAULTS)}")
    parser.add_argument("--agent-args", default="", help="extra flags for `metal-agent run` (default: its defaults)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    parser.add_argument("--keep-logs", type=Path, help="copy the agent's and llama-servers' logs here at the end")
    args = parser.parse_args()
    if not netns.available():
        sys.exit("bench/faults.py needs root and iproute2 (network namespaces)")
    chosen = [f for f in args.only.split(",") if f] or list(FAULTS)
    if unknown := set(chosen) - set(FAULTS):
        sys.exit(f"unknown faults: {', '.join(sorted(unknown))}")

    llama = cached("build-llama-server.sh")
    model = tiny_model.ensure_model(tiny_model.DEFAULT, llama.parent.parent / "models" / "ggml-vocab-llama-spm.gguf")
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="metal-agent-faults-") as tmp:
        tmp = Path(tmp)
        cp = ControlPlane(Binaries.in_dir(cached("build-controlplane.sh")), tmp / "cp")
        toxiproxy = ToxiproxyServer(cached("build-toxiproxy.sh"), tmp)
        workdir = tmp / "mac"
        # The agent's log directory on a tmpfs of its own, with launchd's agent.log in it (the
        # agent's stdout and stderr), so the full-disk fault is the real thing.
        tmpfs = mount_tmpfs(workdir / "logs", "256m")
        if tmpfs:  # every agent the bench starts writes agent-1.log (a new AgentProcess each time)
            (workdir / "agent-1.log").symlink_to(workdir / "logs" / "agent.log")
        await cp.start()
        await toxiproxy.start()
        models = await ModelHTTPServer().start()
        admin = await api_client(cp.admin_kubeconfig)
        try:
            await install_metal_agent(admin)
            cluster = Cluster(admin, await create_namespace(admin, "faults"))
            await cluster.create_model("tiny", f"file://{model}")
            proxy = await toxiproxy.create_proxy(f"127.0.0.1:{cp.port}")
            kubeconfig = kubeconfig_via(cp.agent_kubeconfig, tmp / "agent-via-toxiproxy.kubeconfig", proxy.port)
            # Memory readings from a file (Normal but for the eviction fault); eviction on, as a
            # Mac that should survive pressure runs it. Everything else: the agent's defaults.
            memory = MemoryFile(tmp / "memory.json")
            flags = ["--no-front-door", "--eviction-enabled", "--memory-readings-file", str(memory.path), *shlex.split(args.agent_args)]
            async with faulty_mac(cluster, proxy, kubeconfig, workdir, llama, agent_flags=flags,
                                  log_level="info") as mac:
                forwarder, inner_port = await netns.forward_into(mac.ns, models.port)
                bench = FaultBench(mac, cp, [f"svc-{i}" for i in range(args.services)], args.scale, tmpfs,
                                   models, lambda path: f"http://127.0.0.1:{inner_port}{path}", memory, model)
                await bench.begin()
                try:
                    for key in chosen:
                        method, expected = FAULTS[key]
                        rows.append(await bench.measure(key, expected, getattr(bench, method)))
                finally:
                    await bench.end()
                    forwarder.close()
                    if args.keep_logs:
                        shutil.copytree(workdir / "logs", args.keep_logs, dirs_exist_ok=True)
        finally:
            await admin.close()
            await models.stop()
            await toxiproxy.stop()
            await cp.stop()
            if tmpfs:
                subprocess.run(["umount", "-l", str(workdir / "logs")], check=False)

    results = {
        "command": " ".join([".venv/bin/python", "bench/faults.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "services": args.services, "scale": args.scale, "agent_args": args.agent_args,
        "seconds": round(time.monotonic() - started), "faults": [asdict(r) for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print()
    print(table(rows))
    for r in rows:
        for note in r.notes:
            print(f"  {r.fault}: {note}")
    print(f"\nwritten to {args.out}")
    misses = [(r.fault, m) for r in rows for m in missed(r)]
    for fault, miss in misses:
        print(f"MISSED: {fault}: {miss}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
