"""Many Macs, one cluster (issue 14): three agents with `--fleet`, each in its own network namespace.

The Macs are tests/support/fleet.py's: each agent reaches the real
kube-apiserver as the least-privilege identity (RBAC on: the fleet's Role
grants Leases in `metal-agent` only), with short leases (6 s).
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from metal_agent.adapters.model_cache import CachePaths
from tests.support import netns
from tests.support.agent import kill_recorded_processes
from tests.support.fleet import (LEASE_S, START_TIMEOUT, Mac, ReadyWatcher, answers, cli_in, fleet_of,
                                 ready_endpoints, ready_on, slices)
from tests.support.isvc import Cluster
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]


@pytest.fixture
async def cluster(admin_api, namespace, tiny_model):
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    return cluster


async def test_placement_follows_selectors_prefers_the_model_on_disk_and_says_what_fits_nowhere(
        control_plane, llama_server_bin, tmp_path, namespace, cluster, tiny_model):
    specs = {"a": {"size": "small"}, "b": {"size": "big"}, "c": {"size": "big"}}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs) as macs:
        a, b, c = macs
        # Only b has the file of a model downloaded from elsewhere (its cache, as a finished download).
        url = "https://127.0.0.1:9/models/tiny-remote.gguf"
        cached = CachePaths.for_url(b.workdir / "models", url, "tiny-remote.gguf").final
        cached.parent.mkdir(parents=True)
        shutil.copyfile(tiny_model, cached)
        await asyncio.gather(*(m.agent.start() for m in macs))
        await cluster.create_model("remote", url)

        async def everyone_knows_b_has_it() -> bool:
            views = await asyncio.gather(*(m.fleet() for m in macs))
            return all(f"{namespace}/remote" in next(r["models"] for r in v["members"] if r["member"] == b.name)
                       for v in views)
        await wait_for(everyone_knows_b_has_it, timeout=30, what="b's Lease to say it has the model")
        await cluster.create_model("huge", f"file://{tiny_model}", hardware={"accelerator": "metal",
                                                                              "memoryBudget": "1Mi"})
        await cluster.create_isvc("small-one", "tiny", contextSize=256, nodeSelector={"size": "small"})
        await cluster.create_isvc("pinned", "tiny", contextSize=256, affinity={"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [c.name]}]}]}}})
        await cluster.create_isvc("from-disk", "remote", contextSize=256)
        await cluster.create_isvc("too-big", "huge", contextSize=256)

        assert await wait_for(lambda: ready_on(cluster, "small-one", macs), timeout=START_TIMEOUT,
                              what="small-one ready") == [a]
        assert await wait_for(lambda: ready_on(cluster, "pinned", macs), timeout=START_TIMEOUT,
                              what="pinned ready") == [c]
        assert await wait_for(lambda: ready_on(cluster, "from-disk", macs), timeout=START_TIMEOUT,
                              what="from-disk ready") == [b]
        # One slice per serving Mac, named for it, behind the one Service.
        assert [s.metadata.name for s in await slices(cluster, "small-one")] == [f"small-one-{a.name}"]
        for name in ("small-one", "pinned", "from-disk"):
            assert (await cluster.core.read_namespaced_service(name, cluster.ns)).spec.ports[0].target_port == "http"
        assert f"{namespace}/from-disk#0" in await b.holds()

        # `kubectl get leases -l llmkube.ai/fleet-role=member -L ...` shows the Macs: labels on the member Lease.
        from kubernetes_asyncio import client

        async def a_lease_labels():
            lease = await client.CoordinationV1Api(cluster.api).read_namespaced_lease(f"member.{a.name}", "metal-agent")
            labels = lease.metadata.labels
            return labels if labels.get("llmkube.ai/serving") == "1" else None
        labels = await wait_for(a_lease_labels, timeout=30, what="a's Lease to say it serves one replica")
        assert labels["kubernetes.io/hostname"] == a.name and labels["size"] == "small"
        assert labels["llmkube.ai/fleet-role"] == "member" and labels["llmkube.ai/cordoned"] == "false"
        assert int(labels["llmkube.ai/memory-gib"]) >= 1 and int(labels["llmkube.ai/free-gib"]) >= 0

        async def unschedulable():
            status = await cluster.status("too-big")
            return status if status.get("schedulingStatus") == "Unschedulable" else None
        status = await wait_for(unschedulable, timeout=START_TIMEOUT, what="too-big Unschedulable")
        message = status["schedulingMessage"]
        assert message.startswith("0/3 Macs can take it: "), message
        for mac in macs:
            assert mac.name in message
        assert "needs" in message and "exceeds the budget of 0.00 GiB (the Model's memoryBudget)" in message
        assert status["phase"] == "Pending"
        assert not await slices(cluster, "too-big")
        assert "Placed" in await cluster.event_reasons("pinned")


async def test_two_replicas_on_two_macs_then_a_mac_loses_power(
        control_plane, llama_server_bin, tmp_path, namespace, cluster):
    specs = {"a": {}, "b": {}, "c": {}}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs) as macs:
        await asyncio.gather(*(m.agent.start() for m in macs))
        await cluster.create_isvc("pair", "tiny", contextSize=256, replicas=2)
        serving = await wait_for(lambda: ready_on(cluster, "pair", macs, count=2), timeout=START_TIMEOUT,
                                 what="two replicas ready")
        assert len(await slices(cluster, "pair")) == 2
        for address, port in await ready_endpoints(cluster, "pair"):
            assert await answers(address, port)
        spare = next(m for m in macs if m not in serving)

        async def placed_on_both():
            cond = await cluster.condition("pair", "FleetPlacement")
            status = await cluster.status("pair")
            return cond if cond and cond["status"] == "True" and "starting" not in cond["message"] \
                and status.get("readyReplicas") == 2 and status.get("phase") == "Ready" else None
        cond = await wait_for(placed_on_both, timeout=30, what="FleetPlacement names both Macs")
        for mac in serving:
            assert f"on {mac.name} (ready)" in cond["message"]

        async with ReadyWatcher(cluster, "pair") as watcher:
            dead = serving[0]
            dead.agent.kill()
            kill_recorded_processes(dead.workdir / "state")
            await netns._ip("link", "set", dead.ns.outer_if, "down")
            gone = time.monotonic()
            async def moved():
                on = await ready_on(cluster, "pair", macs, count=2)
                return on if on and dead not in on else None
            now_serving = await wait_for(moved, timeout=START_TIMEOUT, what="replica served elsewhere")
            took = time.monotonic() - gone
        assert sorted(m.name for m in now_serving) == sorted([serving[1].name, spare.name])
        assert watcher.most <= 2, "more ready endpoints than replicas"
        # The dead Mac's endpoint went not-ready once its Lease expired (plus one renew interval of slack).
        # (expiry is one lease after its last renewal, at most a renew interval before `gone`; then a tick,
        # a read of its Lease and the slice patch: generous for a loaded machine)
        assert watcher.last_ready[dead.ns.inner_ip] - gone <= LEASE_S + 4
        assert took < LEASE_S + 60
        assert "Moved" in await cluster.event_reasons("pair")
        for address, port in await ready_endpoints(cluster, "pair"):
            assert await answers(address, port)

        # Scaled to zero: nobody serves it, one Mac says so.
        await cluster.patch_isvc("pair", {"replicas": 0})
        await cluster.wait_phase("pair", "Stopped", timeout=30)
        await wait_for(lambda: _no_ready(cluster, "pair"), timeout=30, what="no ready endpoint")
        assert (await cluster.core.read_namespaced_service("pair", cluster.ns)).spec.cluster_ip


async def _no_ready(cluster: Cluster, service: str) -> bool:
    return not await ready_endpoints(cluster, service)


async def test_a_mac_cut_off_from_the_api_stops_serving_before_another_takes_over(
        control_plane, llama_server_bin, tmp_path, namespace, cluster, toxic_api):
    specs = {"a": {}, "b": {}}
    ports = {"b": toxic_api.proxy.port, "b:kubeconfig": toxic_api.kubeconfig}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs, api_ports=ports) as macs:
        a, b = macs
        await b.agent.start()
        await cluster.create_isvc("solo", "tiny", contextSize=256)
        assert await wait_for(lambda: ready_on(cluster, "solo", macs), timeout=START_TIMEOUT, what="solo on b") == [b]
        await a.agent.start()
        pid = (await b.agent.services())[0]["pid"]

        async with ReadyWatcher(cluster, "solo") as watcher:
            await toxic_api.proxy.disable()
            cut = time.monotonic()

            async def b_stopped() -> bool:
                return not await b.agent.services()
            await wait_for(b_stopped, timeout=LEASE_S + 10, what="b to stop its llama-server")
            stopped_at = time.monotonic()
            stopped_after = stopped_at - cut

            async def on_a():
                return await ready_on(cluster, "solo", macs) == [a]
            await wait_for(on_a, timeout=START_TIMEOUT, what="solo on a")
            await wait_for(lambda: a.ns.inner_ip in watcher.first_ready, timeout=10, what="the watcher to see a")
        # b fences itself one renew interval before its lease can expire for others: it has stopped
        # before a's endpoint is first seen ready (the bound allows for the polling on a loaded machine).
        assert stopped_at <= watcher.first_ready[a.ns.inner_ip], "b still served when a took over"
        assert stopped_after <= LEASE_S + 2, f"b served {stopped_after:.1f}s after losing the API"
        assert watcher.most <= 1, "two Macs served one replica"
        with pytest.raises(ProcessLookupError):
            import os
            os.kill(pid, 0)
        # b comes back: it does not resume what moved.
        await toxic_api.proxy.enable()
        await wait_for(lambda: _renewed(b), timeout=30, what="b renewing again")
        assert await ready_on(cluster, "solo", macs) == [a]
        assert not await b.agent.services()


async def _renewed(mac: Mac) -> bool:
    return not (await mac.fleet())["fenced"]


async def test_the_allowlist_keeps_its_meaning_in_a_fleet(control_plane, llama_server_bin, tmp_path, namespace,
                                                          cluster):
    specs = {"a": {}}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs,
                        extra=("--inference-service-allowlist", "mine")) as macs:
        (a,) = macs
        await a.agent.start()
        await cluster.create_isvc("mine", "tiny", contextSize=256)
        await cluster.create_isvc("theirs", "tiny", contextSize=256)
        assert await wait_for(lambda: ready_on(cluster, "mine", macs), timeout=START_TIMEOUT, what="mine") == [a]
        assert [r["service"] for r in await a.agent.services()] == [f"{namespace}/mine"]
        assert not await slices(cluster, "theirs")
        assert await cluster.status("theirs") == {}  # not this Mac's to speak for: untouched


async def test_drain_moves_a_service_with_no_moment_without_a_ready_endpoint(
        control_plane, llama_server_bin, tmp_path, namespace, cluster):
    specs = {"a": {}, "b": {}}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs) as macs:
        a, b = macs
        await a.agent.start()
        await cluster.create_isvc("moving", "tiny", contextSize=256)
        assert await wait_for(lambda: ready_on(cluster, "moving", macs), timeout=START_TIMEOUT, what="on a") == [a]
        await b.agent.start()
        code, out = await cli_in(a, "fleet")
        assert code == 0, out
        assert f"{a.name} (this Mac)" in out and b.name in out and f"{namespace}/moving#0" in out

        async with ReadyWatcher(cluster, "moving") as watcher:
            code, out = await cli_in(a, "drain")
            assert code == 0, out
            assert f"{namespace}/moving#0: " in out and "drained" in out

            async def only_on_b():
                return await ready_on(cluster, "moving", macs) == [b] and not await a.agent.services()
            await wait_for(only_on_b, timeout=START_TIMEOUT, what="moving served by b only")
        assert watcher.zero_s == 0 and watcher.zero_since is None, "the service had no ready endpoint"
        assert watcher.most <= 2  # make before break: at most the new one beside the old, briefly
        assert "Moved" in await cluster.event_reasons("moving")
        assert (await a.fleet())["cordoned"]

        # Cordoned survives an agent restart; a new service does not go to a drained Mac.
        await a.agent.stop()
        await a.agent.start()
        await cluster.create_isvc("fresh", "tiny", contextSize=256)
        assert await wait_for(lambda: ready_on(cluster, "fresh", macs), timeout=START_TIMEOUT, what="fresh") == [b]
        code, out = await cli_in(a, "uncordon")
        assert code == 0 and "uncordoned" in out, out
        assert not (await a.fleet())["cordoned"]


async def test_uninstall_drains_the_mac_first(control_plane, llama_server_bin, tmp_path, namespace, cluster):
    """scripts/uninstall-metal-agent.sh in prefix mode (tests/integration/test_install_scripts.py's
    stand-in launchctl), run on the Mac: the drain comes before anything is unloaded."""
    from tests.integration.test_install_scripts import UNINSTALL
    from tests.integration.test_install_scripts import Mac as InstallRoot

    specs = {"a": {}, "b": {}}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs) as macs:
        a, b = macs
        await a.agent.start()
        await cluster.create_isvc("leaving", "tiny", contextSize=256)
        assert await wait_for(lambda: ready_on(cluster, "leaving", macs), timeout=START_TIMEOUT, what="on a") == [a]
        await b.agent.start()
        (tmp_path / "install").mkdir()
        root = InstallRoot(tmp_path / "install")
        env = root.env(METAL_AGENT_LISTEN=f"{a.agent.listen_host}:{a.agent.port}")
        async with ReadyWatcher(cluster, "leaving") as watcher:
            proc = await asyncio.create_subprocess_exec(*a.ns.wrap(["bash", str(UNINSTALL)]), env=env,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out = (await asyncio.wait_for(proc.communicate(), timeout=START_TIMEOUT + 30))[0].decode()
            assert proc.returncode == 0, out
            assert await ready_on(cluster, "leaving", macs) == [b]
        assert out.index("drained") < out.index("was not loaded"), out
        assert watcher.zero_s == 0 and watcher.zero_since is None


async def test_an_agent_restart_keeps_its_replicas_and_their_llama_servers(
        control_plane, llama_server_bin, tmp_path, namespace, cluster):
    """Within the lease duration a restarted agent is the same member: it still holds its replicas
    and adopts its running llama-servers (no reload), as a single agent does."""
    specs = {"a": {}, "b": {}}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs) as macs:
        a, b = macs
        await a.agent.start()
        await cluster.create_isvc("kept", "tiny", contextSize=256)
        assert await wait_for(lambda: ready_on(cluster, "kept", macs), timeout=START_TIMEOUT, what="on a") == [a]
        await b.agent.start()
        pid = (await a.agent.services())[0]["pid"]
        async with ReadyWatcher(cluster, "kept") as watcher:
            await a.agent.stop()
            await a.agent.start()

            async def adopted():
                rows = await a.agent.services()
                return rows and rows[0]["pid"] == pid and rows[0]["state"] == "Ready" and rows[0]["adopted"]
            await wait_for(adopted, timeout=30, what="a to adopt its llama-server")
        assert await ready_on(cluster, "kept", macs) == [a]
        assert watcher.zero_s == 0 and watcher.zero_since is None
        assert f"{namespace}/kept#0" in await a.holds() and not await b.agent.services()
        assert await a.agent.metric("llmkube_metal_agent_fleet_replicas_held") == 1
        assert await b.agent.metric("llmkube_metal_agent_fleet_replicas_held") == 0
        # (>=: the fleet namespace is shared by the tests; earlier tests' Macs look alive for one lease)
        assert await a.agent.metric("llmkube_metal_agent_fleet_members", {"state": "alive"}) >= 2
        assert await a.agent.metric("llmkube_metal_agent_fleet_fenced") == 0
        assert await a.agent.metric("llmkube_metal_agent_fleet_lease_renewals_total", {"outcome": "ok"}) >= 1


async def test_scaling_up_and_down_and_deleting(control_plane, llama_server_bin, tmp_path, namespace, cluster,
                                                admin_api):
    from kubernetes_asyncio import client

    specs = {"a": {}, "b": {}}
    async with fleet_of(control_plane, llama_server_bin, tmp_path, namespace, specs) as macs:
        await asyncio.gather(*(m.agent.start() for m in macs))
        await cluster.create_isvc("elastic", "tiny", contextSize=256)
        (first,) = await wait_for(lambda: ready_on(cluster, "elastic", macs), timeout=START_TIMEOUT, what="one")
        await cluster.patch_isvc("elastic", {"replicas": 2})
        await wait_for(lambda: ready_on(cluster, "elastic", macs, count=2), timeout=START_TIMEOUT, what="two")
        await cluster.patch_isvc("elastic", {"replicas": 1})
        assert await wait_for(lambda: _only(cluster, "elastic", macs, first), timeout=START_TIMEOUT,
                              what="back to the first Mac only") == [first]
        other = next(m for m in macs if m is not first)
        await wait_for(lambda: _idle(other), timeout=30, what="the second Mac to stop its llama-server")

        await cluster.delete_isvc("elastic")
        leases = client.CoordinationV1Api(admin_api)

        async def gone() -> bool:
            left = await leases.list_namespaced_lease("metal-agent", label_selector="llmkube.ai/fleet-role=replica")
            mine = [x for x in left.items if x.metadata.labels.get("llmkube.ai/inference-service-namespace") == namespace]
            services = await cluster.core.list_namespaced_service(namespace)
            return not mine and not await slices(cluster, "elastic") and not services.items
        await wait_for(gone, timeout=30, what="replica Leases, slices and the Service removed")


async def _only(cluster: Cluster, service: str, macs: list[Mac], mac: Mac):
    on = await ready_on(cluster, service, macs)
    return on if on == [mac] and len(await slices(cluster, service)) == 1 else None


async def _idle(mac: Mac) -> bool:
    return not await mac.agent.services()
