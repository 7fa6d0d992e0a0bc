"""What authenticated metrics cost: scrape latency from the network, and reviews sent to the API server.

Real parts: etcd + kube-apiserver (RBAC on), the real agent in a network
namespace (the "Mac") with its least-privilege identity, ServiceAccount
tokens from the TokenRequest API bound to the shipped monitoring
ClusterRole. Prints a table and writes JSON to bench/results/.

    .venv/bin/python bench/metrics_scrape.py [--scrapes 200] [--seconds 60]   (root: network namespaces)

Figures:
  /metrics from the network, a token not seen before (TokenReview + SubjectAccessReview), p50/p95
  /metrics from the network, a token seen within the cache's 60 s, p50/p95
  API reviews/min for one Prometheus scraping every second (goal: 2, the cache's worth)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.assets import cached  # noqa: E402
from bench.goals import at_most, report, shown_only  # noqa: E402
from tests.support import netns  # noqa: E402
from tests.support.agent import agents_in_netns  # noqa: E402
from tests.support.controlplane import Binaries, ControlPlane  # noqa: E402
from tests.support.kube import api_client, create_namespace, grant_monitoring, install_metal_agent, service_account_token  # noqa: E402


REVIEWS = re.compile(r'^apiserver_request_total\{.*[{,]resource="(tokenreviews|subjectaccessreviews)".* (\S+)$')


async def reviews(cp: ControlPlane) -> float:
    return sum(float(m.group(2)) for line in (await cp.metrics_text()).splitlines() if (m := REVIEWS.match(line)))


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--fresh-tokens", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    if not netns.available():
        sys.exit("needs root and iproute2 (network namespaces)")
    llama = cached("build-llama-server.sh")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="metal-agent-bench-scrape-") as tmpdir:
        tmp = Path(tmpdir)
        cp = ControlPlane(Binaries.in_dir(cached("build-controlplane.sh")), tmp / "cp")
        await cp.start()
        admin = await api_client(cp.admin_kubeconfig)
        try:
            await install_metal_agent(admin)
            ns = await create_namespace(admin)
            await grant_monitoring(admin, ns, "bench-prometheus")
            tokens = [await service_account_token(admin, ns, "prometheus", create=not i) for i in range(args.fresh_tokens)]
            (tmp / "agent").mkdir()
            async with agents_in_netns(kubeconfig=cp.agent_kubeconfig, api_port=cp.port, llama_server=llama,
                                       workdir=tmp / "agent", namespaces=(ns,),
                                       # 20 new tokens back to back from one address is what the review
                                       # budget refuses (10 in a burst, then 1/s: bench/review_flood.py);
                                       # here it measures what a review costs, so the budget is widened.
                                       extra_args=("--agent-namespace", ns, "--log-level", "info",
                                                   "--token-review-rate", "100", "--token-review-global-rate", "100")
                                       ) as (_, make_agent):
                agent = make_agent()
                await agent.start()
                async with aiohttp.ClientSession() as http:
                    async def scrape(tok: str) -> float:
                        t0 = time.perf_counter()
                        async with http.get(agent.metrics_url, headers={"Authorization": f"Bearer {tok}"}) as resp:
                            await resp.read()
                            assert resp.status == 200, (resp.status, await resp.text())
                        return (time.perf_counter() - t0) * 1000

                    await scrape(tokens[0])  # warm the connection pool and the agent
                    fresh = [await scrape(t) for t in tokens[1:]]
                    warm = [await scrape(tokens[0]) for _ in range(args.scrapes)]
                    before, t0 = await reviews(cp), time.monotonic()
                    end = t0 + args.seconds
                    while time.monotonic() < end:
                        await scrape(tokens[0])
                        await asyncio.sleep(1.0)  # a Prometheus with scrape_interval 1s
                    per_min = (await reviews(cp) - before) * 60 / (time.monotonic() - t0)
                    total = await reviews(cp)
            results = {
                "fresh_token_ms": {"p50": round(statistics.median(fresh), 1), "p95": round(pct(fresh, 0.95), 1)},
                "cached_token_ms": {"p50": round(statistics.median(warm), 1), "p95": round(pct(warm, 0.95), 1)},
                "reviews_per_min_1s_scrapes": round(per_min, 2),
                "reviews_total": total,  # fresh tokens: 2 each, plus the cached token's renewals
            }
        finally:
            await admin.close()
            await cp.stop()
    figures = [
        shown_only("/metrics from the network, new token (TokenReview + SAR), p50 / p95",
                   f"{results['fresh_token_ms']['p50']} / {results['fresh_token_ms']['p95']} ms"),
        shown_only("/metrics from the network, cached token, p50 / p95",
                   f"{results['cached_token_ms']['p50']} / {results['cached_token_ms']['p95']} ms"),
        at_most("API reviews/min, one Prometheus scraping every 1 s", results["reviews_per_min_1s_scrapes"], 2),
    ]
    out = REPO / "bench" / "results" / "metrics_scrape.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return report(figures)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
