"""Real faults between the agent and a real kube-apiserver, and in the agent's own Mac.

The agent runs in a network namespace (the "Mac", with a routable address in
its EndpointSlices) and reaches the API server through Toxiproxy
(`toxic_api`), which blackholes, resets, delays or cuts its connections on
cue. Each test asserts outcomes, not timings:

- no needless llama-server restart: a pid changes only when the fault killed
  that process;
- the agent never exits;
- no EndpointSlice says ready for an endpoint that does not answer /health
  for longer than about a second (a prober reads the slices and asks the
  endpoints every 100 ms: tests/support/toxiproxy.py);
- after the fault, everything converges: slices ready on the right ports and
  refreshed after the fault ended, status Ready, /readyz 200, and every
  llama-server running is recorded and supervised (no orphan).

A fault that must *last* awaits a timer for its duration (METAL_AGENT_FAULT_SECONDS,
default 4 s); everything else waits on conditions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from kubernetes_asyncio import client

from metal_agent.adapters.process.pause_point import AFTER_EXEC
from metal_agent.adapters.process.pause_point import ENV as PAUSE_ENV
from tests.support import netns
from tests.support.agent import AgentProcess
from tests.support.isvc import Cluster
from tests.support.procs import process_gone, stopped
from tests.support.slowness import scaled
from tests.support.toxiproxy import FaultyMac, faulty_mac, fill_filesystem
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

FAULT_S = float(os.environ.get("METAL_AGENT_FAULT_SECONDS", "4"))
# --no-front-door: the slice probers here measure how long a slice names a dead engine port, which
# behind the front door (the default) cannot happen: its port stays and it holds requests.
AGENT_FLAGS = ("--no-front-door", "--liveness-interval", "0.5", "--liveness-failures", "2",
               "--heartbeat-interval", "1")


def dead_ready_limit() -> float:
    """Seconds a slice may say ready for an endpoint that does not answer: 1 on an idle machine."""
    return scaled(1.0)


CONVERGE_TIMEOUT = 60  # generous: a deadline for a condition, not a goal


@pytest.fixture
async def rig(control_plane, admin_api, namespace, llama_server_bin, tiny_model, tmp_path, toxic_api):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    async with faulty_mac(cluster, toxic_api.proxy, toxic_api.kubeconfig, tmp_path, llama_server_bin,
                          agent_flags=AGENT_FLAGS) as mac:
        try:
            yield mac
        finally:
            for prober in mac.probers:  # shown with the test's output (-rP, or on failure)
                print(f"slice prober:\n{prober.describe()}")


async def hold(began: float, seconds: float = FAULT_S) -> None:
    """The fault lasts `seconds` from `began`: a timer, not a synchronisation."""
    remaining = seconds - (time.monotonic() - began)
    if remaining > 0:
        await asyncio.sleep(remaining)


async def unreachable(agent: AgentProcess) -> bool:
    status, text = await agent._get("/readyz")
    return status == 503 and "unreachable" in text


async def watch_failures(agent: AgentProcess, resource: str = "inferenceservices") -> float:
    return await agent.metric("llmkube_metal_agent_watch_failures_total", {"resource": resource}) or 0


# -- the API server's link -------------------------------------------------


async def test_blackholed_api_with_a_llama_server_killed_meanwhile(rig):
    """Every byte to and from the API dropped, nothing closed. A llama-server killed meanwhile is
    restarted locally at once; a service created meanwhile is served when the API returns."""
    agent, pids = await rig.serve("hit", "bystander")
    async with rig.probe(["hit", "bystander"]) as probe:
        async with rig.proxy.fault("blackhole"):
            began = time.monotonic()
            os.kill(pids["hit"], signal.SIGKILL)
            restarted = await wait_for(lambda: rig.ready_pid(agent, "hit", other_than=pids["hit"]), timeout=30,
                                       what="restart during the blackhole", on_timeout=agent.process.tail)
            await probe.wait_sampled(since=time.monotonic())  # looked at the restart while the API is away
            await rig.create("late")  # the agent can only learn of it after the blackhole
            await hold(began)
            assert agent.process.running
        ended = time.time()
        await rig.wait_converged(agent, ["hit", "bystander", "late"], since=ended)
        await probe.wait_sampled(since=time.monotonic())  # and once the API is back
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    after = await rig.pids(agent)
    assert (after["hit"], after["bystander"]) == (restarted, pids["bystander"])
    assert await rig.restarts(agent, "hit") == 1 and await rig.restarts(agent, "bystander") == 0
    await rig.cluster.wait_event("hit", "Restarting")  # raised during the outage, delivered after it


async def test_readyz_says_unreachable_during_a_blackhole(rig):
    agent, _ = await rig.serve("steady")
    async with rig.proxy.fault("blackhole"):
        # Every API call gives up after 20 s (README): by then the agent knows the API is away.
        await wait_for(lambda: unreachable(agent), timeout=25, interval=0.5, what="/readyz 503 during a blackhole")
    await rig.wait_converged(agent, ["steady"], since=time.time())


async def test_every_connection_reset(rig):
    agent, pids = await rig.serve("steady")
    async with rig.probe(["steady"]) as probe:
        async with rig.proxy.fault("reset_peer"):
            began = time.monotonic()
            await rig.touch("steady")  # watch traffic, so the watch meets the resets too
            await wait_for(lambda: unreachable(agent), timeout=30, what="/readyz 503 (API unreachable)")
            await probe.wait_sampled(since=time.monotonic())  # looked while every connection is reset
            await rig.create("late")
            await hold(began)
        ended = time.time()
        await rig.wait_converged(agent, ["steady", "late"], since=ended)
        await probe.wait_sampled(since=time.monotonic())  # and once the API is back
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    assert (await rig.pids(agent))["steady"] == pids["steady"]
    assert await rig.restarts(agent, "steady") == 0


LATENCY_MS, JITTER_MS = 2000, 500
ROUND_TRIP_S = (LATENCY_MS + JITTER_MS) / 1000  # the slowest answer under the latency toxic


async def test_two_second_latency_with_jitter(rig):
    """Every chunk from the API server 2 s ± 0.5 s late: a spec change still respawns exactly
    once, heartbeats keep coming, nothing else restarts."""
    agent, pids = await rig.serve("changed", "steady")
    first = await heartbeat(rig, "steady")
    async with rig.probe(["changed", "steady"]) as probe:
        async with rig.proxy.fault("latency", LATENCY_MS, JITTER_MS):
            began = time.monotonic()
            await rig.cluster.patch_isvc("changed", {"contextSize": 512})
            new = await wait_for(lambda: rig.ready_pid(agent, "changed", other_than=pids["changed"]), timeout=60,
                                 what="respawn under latency")
            await wait_for(lambda: heartbeat_after(rig, "steady", first), timeout=30, what="a heartbeat under latency")
            await probe.wait_sampled(since=time.monotonic())  # looked at the respawn under latency
            await hold(began, max(FAULT_S, 6))
        ended = time.time()
        await rig.wait_converged(agent, ["changed", "steady"], since=ended)
        await probe.wait_sampled(since=time.monotonic())  # and once the latency is gone
    # The respawn's slice update costs API calls, each a round trip late (see the next test).
    assert probe.longest_dead() <= 2 * ROUND_TRIP_S + dead_ready_limit(), probe.describe()
    assert probe.truth["steady"].longest_wrong == 0, probe.describe()
    after = await rig.pids(agent)
    assert (after["changed"], after["steady"]) == (new, pids["steady"])
    assert "512" == cmdline_value(new, "--ctx-size")
    assert await rig.respawns(agent, "changed") == 1
    assert await rig.restarts(agent, "changed") == 0 and await rig.restarts(agent, "steady") == 0


async def test_a_respawn_under_latency_announces_a_dead_port_no_longer_than_one_round_trip(rig):
    agent, pids = await rig.serve("changed")
    async with rig.probe(["changed"]) as probe:
        async with rig.proxy.fault("latency", LATENCY_MS):  # no jitter: one round trip is LATENCY_MS
            await rig.cluster.patch_isvc("changed", {"contextSize": 512})
            await wait_for(lambda: rig.ready_pid(agent, "changed", other_than=pids["changed"]), timeout=60,
                           what="respawn under latency")
            await wait_for(lambda: _slice_port_is(rig, agent, "changed"), timeout=30, what="the slice to follow")
            await probe.wait_sampled(since=time.monotonic())  # looked at the slice on the new port
    assert probe.longest_dead() <= LATENCY_MS / 1000 + dead_ready_limit(), probe.describe()


async def _slice_port_is(rig: FaultyMac, agent: AgentProcess, name: str) -> bool:
    found = await client.DiscoveryV1Api(rig.cluster.api).read_namespaced_endpoint_slice(f"{name}-metal", rig.cluster.ns)
    row = next(r for r in await agent.services() if r["service"].endswith(f"/{name}"))
    return bool(found.endpoints and found.endpoints[0].conditions.ready and found.ports[0].port == row["port"])


async def heartbeat(rig: FaultyMac, name: str) -> str:
    found = await client.DiscoveryV1Api(rig.cluster.api).read_namespaced_endpoint_slice(f"{name}-metal", rig.cluster.ns)
    return found.metadata.annotations["llmkube.ai/agent-heartbeat"]


async def heartbeat_after(rig: FaultyMac, name: str, previous: str) -> bool:
    return await heartbeat(rig, name) > previous


def cmdline_value(pid: int, flag: str) -> str:
    argv = psutil.Process(pid).cmdline()
    return argv[argv.index(flag) + 1]


async def test_watch_stream_cut_mid_event(rig):
    """Each connection from the API server is closed 512 bytes after the cut begins: the
    InferenceService event of a spec change (kilobytes) is cut in the middle. The change
    is acted on exactly once when the link heals."""
    agent, pids = await rig.serve("cut")
    failures = await watch_failures(agent)
    async with rig.probe(["cut"]) as probe:
        async with rig.proxy.fault("limit_data", 512):
            await rig.cluster.patch_isvc("cut", {"contextSize": 512})
            await wait_for(lambda: _more(watch_failures(agent), failures), timeout=30, what="the watch to be cut")
            assert (await rig.pids(agent))["cut"] == pids["cut"]  # nothing acted on half an event
            await probe.wait_sampled(since=time.monotonic())  # looked while the watch is cut
        ended = time.time()
        await rig.wait_converged(agent, ["cut"], since=ended)
        await probe.wait_sampled(since=time.monotonic())  # and at the respawn once it heals
    new = (await rig.pids(agent))["cut"]
    assert new != pids["cut"] and cmdline_value(new, "--ctx-size") == "512"
    assert await rig.respawns(agent, "cut") == 1 and await rig.restarts(agent, "cut") == 0
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()


async def test_a_broken_watch_resumes_where_it_was(rig):
    """A watch that breaks (connection reset mid-stream) resumes after the last event the agent
    applied: nothing it already acted on is replayed, no spec goes back in time."""
    agent, pids = await rig.serve("drifted")  # created after the agent's first list, as services usually are
    for _ in range(10):
        await rig.touch("drifted")  # history on the watch, all of it with the old spec
    await rig.cluster.patch_isvc("drifted", {"contextSize": 512})
    new = await wait_for(lambda: rig.ready_pid(agent, "drifted", other_than=pids["drifted"]), timeout=30,
                         what="the respawn to contextSize 512")
    failures = await watch_failures(agent)
    async with rig.proxy.fault("reset_peer"):
        await rig.touch("drifted")  # data on the watch stream: it meets the reset
        await wait_for(lambda: _more(watch_failures(agent), failures), timeout=30, what="the watch to break")
    # A slow link while the watch resumes: a replay, if any, arrives event by event. The agent
    # has read the whole stream once it reports a change made after everything else.
    async with rig.proxy.fault("bandwidth", 8):
        await rig.cluster.patch_isvc("drifted", {"replicas": 2})  # 1 -> 2 changes nothing on a Mac
        await wait_for(lambda: _desired_replicas(rig, "drifted", 2), timeout=60, what="replicas 2 in status")
    assert (await rig.pids(agent))["drifted"] == new
    assert await rig.respawns(agent, "drifted") == 1


async def _desired_replicas(rig: FaultyMac, name: str, n: int) -> bool:
    return (await rig.cluster.status(name)).get("desiredReplicas") == n


async def _more(value, than: float) -> bool:
    return (await value) > than


async def test_kube_apiserver_restarted(rig, control_plane):
    """The API server goes away and comes back with a fresh watch cache: every watch resumes
    from a resourceVersion it no longer has (410 Gone) and relists."""
    agent, pids = await rig.serve("steady")
    async with rig.probe(["steady"]) as probe:
        probe.max_unknown_share = 0.9  # the API server the prober reads is down for most of this
        await control_plane.stop_apiserver()
        try:
            await wait_for(lambda: unreachable(agent), timeout=30, what="/readyz 503 while the API server is down")
        finally:
            await control_plane.start_apiserver()
        ended = time.time()
        await rig.create("late")
        await rig.wait_converged(agent, ["steady", "late"], since=ended)
        await probe.wait_sampled(since=time.monotonic())  # looked once the API server is back (it cannot read it while it is down)
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    assert (await rig.pids(agent))["steady"] == pids["steady"]
    assert await rig.restarts(agent, "steady") == 0
    relisted = [json.loads(line)["resource"] for line in agent.log_text().splitlines()
                if "resourceVersion expired; relisting" in line]
    assert set(relisted) == {"inferenceservices", "models"}


# -- the agent itself ------------------------------------------------------


async def new_llama_server(rig: FaultyMac, known: set[int]) -> int | None:
    fresh = rig.llama_servers() - known
    return min(fresh) if fresh else None


async def test_agent_killed_during_a_spawn_and_during_a_respawn(rig):
    """SIGKILL the agent while a new llama-server loads its model, and again between stopping
    the old process of a respawn and starting the new one. The next agent adopts or starts
    exactly what is wanted: no orphan, no second copy, no reload of what already ran."""
    agent, pids = await rig.serve("steady")

    await rig.create("fresh")
    spawned = await wait_for(lambda: new_llama_server(rig, set(pids.values())), timeout=30, interval=0.002,
                             what="the new llama-server to appear")
    await asyncio.to_thread(rig.kill_agent_outside_the_record_window, agent, set(pids.values()))
    await agent.process.wait(timeout=10)
    agent = rig.agent()
    await agent.start()
    await rig.wait_converged(agent, ["steady", "fresh"])
    after = await rig.pids(agent)
    assert after["steady"] == pids["steady"]
    assert after["fresh"] == spawned  # adopted while (or after) it loaded: no second load

    await rig.cluster.patch_isvc("steady", {"contextSize": 512})
    await wait_for(lambda: process_gone(after["steady"]), timeout=30, interval=0.002, what="the respawn to begin")
    await asyncio.to_thread(rig.kill_agent_outside_the_record_window, agent, set(after.values()))
    await agent.process.wait(timeout=10)
    agent = rig.agent()
    await agent.start()
    await rig.wait_converged(agent, ["steady", "fresh"])
    final = await rig.pids(agent)
    assert cmdline_value(final["steady"], "--ctx-size") == "512"
    assert final["fresh"] == after["fresh"]  # adopted again: no reload


async def test_agent_killed_between_exec_and_record_leaves_no_orphan(rig):
    """SIGKILL in the millisecond between a llama-server's exec and the record naming its pid.
    Polling from outside hits that window only sometimes, so the agent holds it open itself
    (METAL_AGENT_PAUSE_AT=after-exec: it SIGSTOPs there) and the kill lands in it every time.
    The next agent finds the process by its command line and adopts or stops it: no orphan."""
    agent, pids = await rig.serve("steady")
    agent.kill()  # everything recorded: the paused agent below adopts "steady", spawns nothing for it
    await agent.process.wait(timeout=10)

    paused = rig.agent()
    paused.options.env[PAUSE_ENV] = AFTER_EXEC
    await paused.start()

    async def steady_adopted() -> bool:
        return await rig.ready_pid(paused, "steady") == pids["steady"]

    await wait_for(steady_adopted, timeout=30, what="steady adopted", on_timeout=paused.process.tail)
    known = rig.llama_servers()
    await rig.create("fresh")
    await wait_for(lambda: stopped(paused.process.pid), timeout=30, what="the agent paused after an exec",
                   on_timeout=paused.process.tail)
    unrecorded, recorded = rig._new_children(paused.process.pid, known)
    assert len(unrecorded) == 1 and not recorded, (unrecorded, recorded, rig.recorded())  # in the window
    assert rig.recorded()[f"{rig.cluster.ns}/fresh"] == 0  # recorded before the exec, without its pid
    paused.kill()
    await paused.process.wait(timeout=10)

    agent = rig.agent()
    await agent.start()
    await rig.wait_converged(agent, ["steady", "fresh"])
    supervised = set((await rig.pids(agent)).values())
    assert rig.llama_servers() == supervised, f"orphans: {rig.llama_servers() - supervised}"
    assert (await rig.pids(agent))["steady"] == pids["steady"]
    (orphan,) = unrecorded
    assert orphan in supervised or process_gone(orphan)  # adopted, or stopped: never left running alone


async def test_sigterm_mid_reconcile_shuts_down_promptly_and_leaves_everything_recorded(rig):
    """SIGTERM while three services are being spawned, and again while reconciles hang on a
    blackholed API: the agent exits within seconds each time, and every llama-server left
    running is recorded for the next agent, which adopts them all."""
    agent = rig.agent()
    await agent.start()
    await rig.create("one", "two", "three")
    await wait_for(lambda: new_llama_server(rig, set()), timeout=30, interval=0.002, what="a spawn in flight")
    agent.process.signal(signal.SIGTERM)
    assert await agent.process.wait(timeout=10) == 0, agent.process.tail()
    assert rig.llama_servers() == set(rig.recorded().values())

    agent = rig.agent()
    await agent.start()
    await rig.wait_converged(agent, ["one", "two", "three"])
    pids = await rig.pids(agent)

    async with rig.proxy.fault("blackhole"):
        os.kill(pids["one"], signal.SIGKILL)  # a restart whose status and slice writes now hang
        await wait_for(lambda: rig.ready_pid(agent, "one", other_than=pids["one"]), timeout=30,
                       what="restart under the blackhole")
        pids = await rig.pids(agent)
        agent.process.signal(signal.SIGTERM)
        assert await agent.process.wait(timeout=10) == 0, agent.process.tail()
    assert rig.llama_servers() == set(rig.recorded().values()) == set(pids.values())

    agent = rig.agent()
    await agent.start()
    await rig.wait_converged(agent, ["one", "two", "three"])
    assert await rig.pids(agent) == pids  # all adopted, none reloaded


async def test_a_llama_server_that_stops_answering_is_restarted_by_liveness(rig):
    agent, pids = await rig.serve("frozen", "bystander")
    async with rig.probe(["frozen", "bystander"]) as probe:
        os.kill(pids["frozen"], signal.SIGSTOP)
        try:
            await probe.wait_sampled(since=time.monotonic())  # looked while it is frozen
            new = await wait_for(lambda: rig.ready_pid(agent, "frozen", other_than=pids["frozen"]), timeout=60,
                                 what="liveness restart")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids["frozen"], signal.SIGCONT)  # let the teardown stop it
            raise
        await rig.wait_converged(agent, ["frozen", "bystander"])
        await probe.wait_sampled(since=time.monotonic())  # and at the restarted one
    assert process_gone(pids["frozen"])
    assert await rig.pids(agent) == {"frozen": new, "bystander": pids["bystander"]}
    assert await rig.restarts(agent, "frozen") == 1 and await rig.restarts(agent, "bystander") == 0
    # A frozen process is only known dead once a probe times out (3 s) after the interval.
    assert probe.longest_dead() <= 0.5 + 3.0 + dead_ready_limit(), probe.describe()
    assert probe.truth["bystander"].longest_dead <= dead_ready_limit(), probe.describe()


async def test_corrupted_record_files_are_ignored(rig):
    """A half-written record, binary junk and an empty file in the state directory: the agent
    starts, leaves them alone, adopts what it can prove and serves the rest."""
    agent, pids = await rig.serve("kept", "damaged")
    agent.kill()
    await agent.process.wait(timeout=10)
    records = rig.state_dir / "processes"
    damaged = records / f"{rig.cluster.ns}__damaged.json"
    damaged.write_text(damaged.read_text()[:40])
    (records / "junk.json").write_bytes(os.urandom(256))
    (records / "empty.json").write_bytes(b"")

    agent = rig.agent()
    await agent.start()
    # The damaged record proves nothing: its process is left alone (never signalled) and a new one serves.
    await wait_for(lambda: _serving_other_than(rig, agent, "damaged", pids["damaged"]), timeout=CONVERGE_TIMEOUT,
                   what="a new llama-server for the damaged record")
    after = await rig.pids(agent)
    assert after["kept"] == pids["kept"]  # adopted: no reload
    assert not process_gone(pids["damaged"])  # unprovable, so untouched
    assert (records / "junk.json").exists() and (records / "empty.json").exists()  # left for inspection
    os.kill(pids["damaged"], signal.SIGKILL)  # the test's own clean-up of the unprovable process
    await wait_for(lambda: process_gone(pids["damaged"]), timeout=10, what="the unprovable process gone")
    await rig.wait_converged(agent, ["kept", "damaged"])
    assert agent.process.running


async def _serving_other_than(rig: FaultyMac, agent: AgentProcess, name: str, pid: int) -> bool:
    return await rig.ready_pid(agent, name, other_than=pid) is not None


WRONG_SHAPES = {
    "null": b"null",
    "list": b"[]",
    "pid-a-string": json.dumps({"version": 1, "key": "x/y", "uid": "u", "pid": "1", "create_time": 0.0,
                                "spec_hash": "h", "port": 1, "host": "h", "argv_digest": "d"}).encode(),
}


@pytest.mark.parametrize("content", list(WRONG_SHAPES.values()), ids=list(WRONG_SHAPES))
async def test_a_record_of_the_wrong_shape_is_ignored(rig, content):
    """Valid JSON that is not a record is a corrupted file like any other: ignored."""
    agent, pids = await rig.serve("kept")
    agent.kill()
    await agent.process.wait(timeout=10)
    odd = rig.state_dir / "processes" / "odd.json"
    odd.write_bytes(content)
    try:
        agent = rig.agent()
        await agent.start()
        await rig.wait_converged(agent, ["kept"])
        assert (await rig.pids(agent))["kept"] == pids["kept"]
    finally:
        odd.unlink()  # the teardown reads the records with the agent's own code


# -- the Mac's disk --------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, check=False).returncode == 0


def _fill(directory: Path) -> None:
    fill_filesystem(directory)


@pytest.fixture
def full_log_dir(tmp_path):
    """The agent's log directory on a small tmpfs, filled to the last byte."""
    logs = tmp_path / "logs"
    if not _mount_tmpfs(logs, "256k"):
        pytest.skip("needs root and tmpfs mounts")
    try:
        yield logs
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)


async def test_the_log_directory_fills_up_while_serving(rig, full_log_dir):
    """launchd's agent.log and every llama-server log live on a disk that fills up: the agent
    keeps serving, restarting, respawning and registering."""
    # As launchd does: the agent's stdout and stderr go to agent.log in the log directory.
    (rig.workdir / "agent-1.log").symlink_to(full_log_dir / "agent.log")
    agent, pids = await rig.serve("one", "two")
    _fill(full_log_dir)
    async with rig.probe(["one", "two"]) as probe:
        os.kill(pids["one"], signal.SIGKILL)
        restarted = await wait_for(lambda: rig.ready_pid(agent, "one", other_than=pids["one"]), timeout=30,
                                   what="restart with the disk full", on_timeout=lambda: _df(full_log_dir))
        await probe.wait_sampled(since=time.monotonic())  # looked at the restart with the disk full
        await rig.cluster.patch_isvc("two", {"contextSize": 512})
        respawned = await wait_for(lambda: rig.ready_pid(agent, "two", other_than=pids["two"]), timeout=15,
                                   what="respawn with the disk full", on_timeout=lambda: rig.dump(agent))
        await rig.wait_converged(agent, ["one", "two"], since=time.time())
        await probe.wait_sampled(since=time.monotonic())  # and at the respawn
    assert probe.longest_dead() <= dead_ready_limit(), probe.describe()
    assert await rig.pids(agent) == {"one": restarted, "two": respawned}
    assert await rig.restarts(agent, "one") == 1 and await rig.restarts(agent, "two") == 0
    assert agent.process.running


async def test_the_agent_starts_with_the_log_directory_full(rig, full_log_dir):
    """A Mac whose disk is already full when launchd (re)starts the agent: it starts, adopts
    and serves, although it cannot write a line of log."""
    (rig.workdir / "agent-2.log").symlink_to(full_log_dir / "agent.log")
    agent, pids = await rig.serve("one")
    agent.kill()
    await agent.process.wait(timeout=10)
    _fill(full_log_dir)
    agent = rig.agent()
    agent.starts = 1  # its output goes to agent-2.log, i.e. agent.log on the full disk
    await agent.start()
    await rig.wait_converged(agent, ["one"])
    assert (await rig.pids(agent))["one"] == pids["one"]


def _df(directory: Path) -> str:
    stat = os.statvfs(directory)
    return f"{directory}: {stat.f_bavail * stat.f_frsize} bytes free"

