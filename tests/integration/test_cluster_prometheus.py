"""The cluster's Prometheus finds every Mac by itself: discovered scrapes, authenticated metrics, energy.

Real parts throughout: upstream Prometheus (scripts/build-prometheus.sh;
Debian's build has Kubernetes discovery patched out) runs the shipped
`manifests/monitoring/scrape-config.yaml` and `recording-rules.yaml` with
`kubernetes_sd_configs` (role endpointslice) against the test kube-apiserver,
as a ServiceAccount bound to nothing but the shipped monitoring ClusterRole.
The only changes to the shipped config are where Prometheus runs from
(outside the cluster: api_server, CA and token file instead of the in-pod
defaults), the agent job's namespace (a fresh one per run), and 1 s
intervals. The agent and its llama-server run in a network namespace (the
"Mac"). Everything is asserted from Prometheus's own HTTP API.

With CI or METAL_AGENT_PRIVILEGED_TESTS=1 (as root) the agent also samples
power through the real sudo, with /usr/bin/powermetrics a stand-in that
replays the real M5 Max capture (powermetrics cannot exist on Linux); then
the gauges, the energy counter and the joules-per-token rules are checked
against that capture. Every PromQL query and its answer is printed (`-s`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from metal_agent.core.agent_registration import AgentEndpoint
from metal_agent.core.energy import sample_energy
from metal_agent.core.powermetrics import parse_text
from metal_agent.core.registration import Registration, label_value
from metal_agent.core.scrape_targets import agent_target_labels, inference_target_labels
from metal_agent.core.sudoers import POWERMETRICS_PATH
from tests.conftest import MANIFESTS, REPO, _cached_asset, _missing
from tests.support import netns
from tests.support.agent import AgentProcess, agents_in_netns
from tests.support.fake_powermetrics import M5_CAPTURE, M5_COMBINED_W, exclusive_stand_in_slot, stand_in_script
from tests.support.isvc import Cluster
from tests.support.kube import create_namespace, delete_namespace, grant_monitoring, service_account_token
from tests.support.prometheus import Prometheus
from tests.support.wait import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 for network namespaces"),
]

MONITORING = MANIFESTS / "monitoring"
PRIVILEGED = hasattr(os, "geteuid") and os.geteuid() == 0 and (
    bool(os.environ.get("CI")) or os.environ.get("METAL_AGENT_PRIVILEGED_TESTS") == "1"
)
POWER_INTERVAL_MS = 1000  # as on a Mac; a stall of 10 intervals would restart the replay mid-capture
HOST = socket.gethostname()  # the agent's host name: the netns shares the UTS namespace


@pytest.fixture(scope="module")
def prometheus_bin() -> Path:
    directory = _cached_asset("build-prometheus.sh")
    if not directory or not (directory / "prometheus").is_file():
        _missing("upstream Prometheus", "run `make dev` (scripts/build-prometheus.sh) to build it")
    return directory / "prometheus"


@pytest.fixture(scope="module")
def power_stand_in(tmp_path_factory) -> Iterator[bool]:
    """True while /usr/bin/powermetrics replays the M5 capture in a loop (privileged runs with
    ../shared only; otherwise only the power test skips, not the module)."""
    capture = REPO.parent / "shared" / M5_CAPTURE
    if not PRIVILEGED or not capture.is_file():
        yield False
        return
    with exclusive_stand_in_slot():
        if Path(POWERMETRICS_PATH).exists():
            yield False  # a real one, or someone else's: never touched
            return
        options = tmp_path_factory.mktemp("powermetrics") / "options"
        options.write_text("--after loop")
        options.parent.chmod(0o755)
        try:
            Path(POWERMETRICS_PATH).write_text(stand_in_script(capture, options))
            Path(POWERMETRICS_PATH).chmod(0o755)
            yield True
        finally:
            Path(POWERMETRICS_PATH).unlink(missing_ok=True)


@dataclass
class Setup:
    cluster: Cluster
    namespace: str  # InferenceServices
    agent_namespace: str  # the agent's Service and slice
    mac: netns.NetNS
    agent: AgentProcess
    prom: Prometheus
    tokens: dict[str, str]  # prometheus (the monitoring role), stranger (no role)
    power: bool


def prometheus_config(control_plane, token_file: Path, agent_namespace: str) -> dict:
    """The shipped scrape config, pointed at the test API server from outside the cluster."""
    (shipped,) = [d for d in yaml.safe_load_all((MONITORING / "scrape-config.yaml").read_text()) if d]
    access = {"api_server": control_plane.url, "tls_config": {"ca_file": str(control_plane.pki.ca_cert)},
              "authorization": {"credentials_file": str(token_file)}}
    jobs = shipped["scrape_configs"]
    for job in jobs:
        for sd in job["kubernetes_sd_configs"]:
            sd.update(access)
            if "namespaces" in sd:
                sd["namespaces"] = {"names": [agent_namespace]}
        if "authorization" in job:
            job["authorization"] = {"credentials_file": str(token_file)}
    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(MONITORING / "recording-rules.yaml")], "scrape_configs": jobs}


@pytest.fixture(scope="module")
async def setup(control_plane, admin_api, llama_server_bin, tiny_model, prometheus_bin, power_stand_in,
                tmp_path_factory) -> Setup:
    workdir = tmp_path_factory.mktemp("cluster-prometheus")
    namespace = await create_namespace(admin_api)
    agent_namespace = await create_namespace(admin_api, prefix="agent")
    binding = f"metal-agent-prometheus-{agent_namespace}"
    rbac = client.RbacAuthorizationV1Api(admin_api)
    await grant_monitoring(admin_api, agent_namespace, binding)
    tokens = {name: await service_account_token(admin_api, agent_namespace, name, create=True)
              for name in ("prometheus", "stranger")}
    token_file = workdir / "prometheus.token"
    token_file.write_text(tokens["prometheus"])
    cluster = Cluster(admin_api, namespace)
    await cluster.create_model("tiny", f"file://{tiny_model}")
    power = ("--power", "--power-interval-ms", str(POWER_INTERVAL_MS)) if power_stand_in else ("--no-power",)
    try:
        async with agents_in_netns(kubeconfig=control_plane.agent_kubeconfig, api_port=control_plane.port,
                                   llama_server=llama_server_bin, workdir=workdir, namespaces=(namespace,),
                                   # the PodMonitor scrapes the engine where its slice names it
                                   extra_args=("--no-front-door", "--agent-namespace", agent_namespace,
                                               "--heartbeat-interval", "2", *power)) as (mac, make_agent):
            agent = make_agent()
            await agent.start()
            prom = Prometheus(prometheus_bin, workdir, config=prometheus_config(control_plane, token_file, agent_namespace))
            await prom.start()
            try:
                yield Setup(cluster, namespace, agent_namespace, mac, agent, prom, tokens, power_stand_in)
            finally:
                await prom.stop()
    finally:
        with suppress(ApiException):
            await rbac.delete_cluster_role_binding(binding)
        await delete_namespace(admin_api, namespace)
        await delete_namespace(admin_api, agent_namespace)


async def promql(prom: Prometheus, expr: str, at: float | None = None) -> list[dict]:
    """An instant query, printed with its answer (the issue asks for both)."""
    result = await prom.query(expr, at)
    shown = [(r["metric"], r["value"][1]) for r in result]
    print(f"PROMQL {expr}{'' if at is None else f' @ {at}'} -> {shown}")
    return result


def one(result: list[dict]) -> dict | None:
    return result[0] if len(result) == 1 else None


async def test_a_macs_llama_server_is_scraped_as_llmkube_inference_and_leaves_with_its_service(setup: Setup):
    s = setup
    await s.cluster.create_isvc("chat.bot", "tiny", contextSize=256)
    await s.cluster.wait_phase("chat.bot", "Ready")
    (row,) = await s.agent.services()

    up = f'up{{job="llmkube-inference",namespace="{s.namespace}",service="chat.bot"}}'
    series = await wait_for(lambda: _value_is(s.prom, up, 1.0), timeout=90, what=f"{up} == 1", interval=0.5)
    expected = inference_target_labels(
        Registration(s.namespace, "chat.bot", "", s.mac.inner_ip, row["port"], True, model="tiny"), HOST)
    assert series["metric"] == {"__name__": "up", **expected, "instance": f"{s.mac.inner_ip}:{row['port']}"}
    assert series["metric"]["model"] == "tiny" and series["metric"]["runtime"] == "llamacpp"

    tokens = f'llamacpp:tokens_predicted_total{{job="llmkube-inference",namespace="{s.namespace}",service="chat.bot"}}'
    before = await wait_for(lambda: _present(s.prom, tokens), timeout=30, what=tokens, interval=0.5)
    async with aiohttp.ClientSession() as http:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        async with http.post(f"http://{s.mac.inner_ip}:{row['port']}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            generated = (await resp.json())["usage"]["completion_tokens"]
    assert generated > 0
    after = await wait_for(lambda: _value_above(s.prom, tokens, float(before["value"][1])), timeout=30,
                           what=f"{tokens} rising", interval=0.5)
    assert float(after["value"][1]) - float(before["value"][1]) == generated
    assert after["metric"]["model"] == "tiny" and after["metric"]["host"] == label_value(HOST)

    # The recording rules see the tokens, per model and per Mac.
    rate = f'namespace_service_model_host:llamacpp_tokens_predicted:rate5m{{namespace="{s.namespace}"}}'
    recorded = await wait_for(lambda: _value_above(s.prom, rate, 0.0), timeout=30, what=rate, interval=0.5)
    assert recorded["metric"] == {"__name__": rate.split("{")[0], "namespace": s.namespace, "service": "chat.bot",
                                  "model": "tiny", "host": label_value(HOST)}
    if s.power:  # joules per token needs the Mac's energy: the replayed capture
        for expr in (f'host:llmkube_joules_per_token:ratio_rate5m{{host="{label_value(HOST)}"}}',
                     'model:llmkube_joules_per_token:ratio_rate5m{model="tiny"}'):
            found = await wait_for(lambda e=expr: _value_above(s.prom, e, 0.0), timeout=30, what=expr, interval=0.5)
            assert float(found["value"][1]) > 0

    # Deleting the service removes the target (and `up` goes stale at once).
    await s.cluster.delete_isvc("chat.bot")

    async def gone() -> bool:
        targets = await s.prom.active_targets()
        mine = [t for t in targets if t["labels"].get("namespace") == s.namespace]
        return not mine and not await promql(s.prom, up)

    await wait_for(gone, timeout=60, what="the target gone from Prometheus", interval=0.5)


async def test_the_agent_is_discovered_with_its_host_label_and_identity(setup: Setup):
    s = setup
    up = f'up{{job="metal-agent",namespace="{s.agent_namespace}"}}'
    series = await wait_for(lambda: _value_is(s.prom, up, 1.0), timeout=90, what=f"{up} == 1", interval=0.5)
    expected = agent_target_labels(AgentEndpoint(s.agent_namespace, HOST, "", s.mac.inner_ip, s.agent.port))
    assert series["metric"] == {"__name__": "up", **expected, "instance": f"{s.mac.inner_ip}:{s.agent.port}"}

    info = one(await promql(s.prom, f'llmkube_metal_agent_host_info{{job="metal-agent",namespace="{s.agent_namespace}"}}'))
    assert info is not None and info["value"][1] == "1"
    assert info["metric"]["hostname"] == HOST and info["metric"]["host"] == label_value(HOST)
    assert int(info["metric"]["memory_bytes"]) > 0 and info["metric"]["agent_version"]


async def test_power_gauges_and_the_energy_counter_follow_the_real_capture(setup: Setup, shared_dir: Path):
    s = setup
    if not s.power:
        pytest.skip("needs the powermetrics stand-in: root with CI or METAL_AGENT_PRIVILEGED_TESTS=1, "
                    f"and no {POWERMETRICS_PATH} already there")
    per_sample = [sample_energy(x, POWER_INTERVAL_MS / 1000).joules["combined"]
                  for x in parse_text((shared_dir / M5_CAPTURE).read_text())]
    assert len(per_sample) == 7

    def expected(n: int) -> float:
        """Joules after n samples of the capture replayed in a loop."""
        loops, rest = divmod(n, len(per_sample))
        return loops * sum(per_sample) + sum(per_sample[:rest])

    sel = f'job="metal-agent",namespace="{s.agent_namespace}"'
    samples = f"llmkube_metal_agent_apple_power_samples_total{{{sel}}}"
    energy = f'llmkube_metal_agent_apple_power_energy_joules_total{{{sel},component="combined"}}'
    first = await wait_for(lambda: _value_above(s.prom, samples, len(per_sample) - 0.5), timeout=90,
                           what=f"{samples} >= 7", interval=0.5)
    t1, n1 = first["value"][0], int(float(first["value"][1]))
    (e1,) = await promql(s.prom, energy, at=t1)
    later = await wait_for(lambda: _value_above(s.prom, samples, n1 + 2.5), timeout=60,
                           what=f"{samples} >= {n1 + 3}", interval=0.5)
    t2, n2 = later["value"][0], int(float(later["value"][1]))
    (e2,) = await promql(s.prom, energy, at=t2)
    j1, j2 = float(e1["value"][1]), float(e2["value"][1])
    assert j1 == pytest.approx(expected(n1), rel=0.01)
    assert j2 == pytest.approx(expected(n2), rel=0.01)
    assert j2 - j1 == pytest.approx(expected(n2) - expected(n1), rel=0.01)  # the increase, sample by sample
    await promql(s.prom, f"increase({energy}[30s])")  # for the record: extrapolated, so not asserted

    (combined,) = await promql(s.prom, f"llmkube_metal_agent_apple_power_combined_watts{{{sel}}}", at=t2)
    assert any(float(combined["value"][1]) == pytest.approx(w) for w in M5_COMBINED_W)
    (up,) = await promql(s.prom, f"llmkube_metal_agent_apple_power_sampler_up{{{sel}}}", at=t2)
    assert up["value"][1] == "1" and combined["metric"]["host"] == label_value(HOST)
    # The GPU's load, beside the watts on the agent's own /metrics, from the same samples.
    replayed = parse_text((shared_dir / M5_CAPTURE).read_text())
    (busy,) = await promql(s.prom, f"llmkube_metal_agent_apple_gpu_active_ratio{{{sel}}}", at=t2)
    (hertz,) = await promql(s.prom, f"llmkube_metal_agent_apple_gpu_active_frequency_hertz{{{sel}}}", at=t2)
    assert any(float(busy["value"][1]) == pytest.approx(x.gpu_active_ratio) for x in replayed)
    assert float(hertz["value"][1]) == 338e6 and busy["metric"]["host"] == label_value(HOST)
    # The mean power over the last 10 s is a mean of the capture's values (each sample's joules
    # arrive once a second). The recorded 5-minute rate exists too, but on a series seconds old
    # rate() divides a few seconds' joules by the whole 5 minutes, so only its presence is checked.
    (mean,) = await promql(s.prom, f"rate({energy}[10s])")
    assert min(M5_COMBINED_W) * 0.9 <= float(mean["value"][1]) <= max(M5_COMBINED_W) * 1.1
    watts = f'host:llmkube_metal_agent_apple_power_watts:rate5m{{host="{label_value(HOST)}"}}'
    await wait_for(lambda: _value_above(s.prom, watts, 0.0), timeout=30, what=watts, interval=0.5)


async def test_scrapes_from_the_network_need_a_token_the_cluster_vouches_for(setup: Setup):
    s = setup
    url = s.agent.metrics_url
    base = url.rsplit("/", 1)[0]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async def get(target: str, token: str | None = None) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.get(target, headers=headers) as resp:
                return resp.status, await resp.text()

        assert (await get(url))[0] == 401
        assert (await get(url, "not-a-token"))[0] == 401
        status, text = await get(url, s.tokens["stranger"])
        assert status == 403 and f"system:serviceaccount:{s.agent_namespace}:stranger" in text
        status, text = await get(url, s.tokens["prometheus"])
        assert status == 200 and "llmkube_metal_agent_host_info" in text
        # The role grants /metrics only: the local status API stays local.
        assert (await get(f"{base}/v1/services", s.tokens["prometheus"]))[0] == 403
        for probe in ("/healthz", "/readyz"):
            assert (await get(base + probe))[0] == 200
    # Loopback, on the Mac itself: no token needed.
    status, text = await netns.http_get_in(s.mac, s.agent.port, "/metrics")
    assert status == 200 and "llmkube_metal_agent_host_info" in text


async def _value_is(prom: Prometheus, expr: str, value: float) -> dict | None:
    found = one(await promql(prom, expr))
    return found if found is not None and float(found["value"][1]) == value else None


async def _value_above(prom: Prometheus, expr: str, floor: float) -> dict | None:
    found = one(await promql(prom, expr))
    return found if found is not None and float(found["value"][1]) > floor else None


async def _present(prom: Prometheus, expr: str) -> dict | None:
    return one(await promql(prom, expr))
