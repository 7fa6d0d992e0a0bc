"""What a flood of made-up bearer tokens costs: TokenReviews sent, and a real scrape's latency during it.

Real parts: etcd + kube-apiserver (RBAC on), the real agent in a network
namespace (the "Mac") with its least-privilege identity, a ServiceAccount
token bound to the shipped monitoring ClusterRole (the "Prometheus", which
has scraped before). Junk tokens come from one source address, then from
many (tests/support/netns.add_sources). TokenReviews are counted by the API
server itself. Prints a table, writes JSON to bench/results/, and exits 1
when a goal is missed.

    .venv/bin/python bench/review_flood.py [--tokens 2000] [--sources 40]   (root: network namespaces)

Goals:
  reviews sent <= the budget: a source's burst (10) + 1/s, or the global burst (20) + 10/s, over the flood
  the known token's scrapes during the flood: all 200, the slowest under 1 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from metal_agent.core.review_limits import GLOBAL_BURST_S, GLOBAL_RATE, PER_SOURCE_BURST_S, PER_SOURCE_RATE  # noqa: E402
from bench.assets import cached  # noqa: E402
from tests.support import netns  # noqa: E402
from tests.support.agent import agents_in_netns  # noqa: E402
from tests.support.controlplane import Binaries, ControlPlane  # noqa: E402
from tests.support.kube import api_client, create_namespace, grant_monitoring, install_metal_agent, service_account_token  # noqa: E402
from tests.support.token_flood import flood, junk, scrape_until, token_reviews  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

SCRAPE_GOAL_MS = 1000.0


async def one_flood(cp, url: str, token: str, n: int, sources: list[str | None]) -> dict:
    before = await token_reviews(cp)
    done = asyncio.Event()
    scraper = asyncio.create_task(scrape_until(url, token, done))
    try:
        junked = await flood(url, junk(n), sources=sources, concurrency=max(32, len(sources)))
    finally:
        done.set()
    scrapes = await scraper
    sent = await token_reviews(cp) - before
    per_source = len(sources) == 1
    bound = (PER_SOURCE_RATE * PER_SOURCE_BURST_S + PER_SOURCE_RATE * junked.seconds if per_source
             else GLOBAL_RATE * GLOBAL_BURST_S + GLOBAL_RATE * junked.seconds) + 2
    return {
        "sources": len(sources), "junk_tokens": n, "seconds": round(junked.seconds, 2),
        "statuses": {str(k): v for k, v in sorted(junked.statuses.items())},
        "reviews_sent": sent, "reviews_bound": round(bound, 1),
        "scrapes": len(scrapes.latencies), "scrape_statuses": {str(k): v for k, v in scrapes.statuses.items()},
        "scrape_p50_ms": round(statistics.median(scrapes.latencies) * 1000, 1),
        "scrape_max_ms": round(max(scrapes.latencies) * 1000, 1),
        "answered_during_refusals": any(junked.first_429 is not None and junked.first_429 < t < junked.last_429
                                        for t in scrapes.answered_at),
    }


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--sources", type=int, default=40)
    args = parser.parse_args()
    if not netns.available():
        sys.exit("needs root and iproute2 (network namespaces)")
    llama = cached("build-llama-server.sh")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="metal-agent-bench-flood-") as tmpdir:
        tmp = Path(tmpdir)
        cp = ControlPlane(Binaries.in_dir(cached("build-controlplane.sh")), tmp / "cp")
        await cp.start()
        admin = await api_client(cp.admin_kubeconfig)
        try:
            await install_metal_agent(admin)
            ns = await create_namespace(admin)
            await grant_monitoring(admin, ns, "bench-flood-prometheus")
            token = await service_account_token(admin, ns, "prometheus", create=True)
            (tmp / "agent").mkdir()
            async with agents_in_netns(kubeconfig=cp.agent_kubeconfig, api_port=cp.port, llama_server=llama,
                                       workdir=tmp / "agent", namespaces=(ns,),
                                       extra_args=("--agent-namespace", ns, "--log-level", "info", "--no-power")) as (mac, make_agent):
                agent = make_agent()
                await agent.start()
                import aiohttp

                async def scraped() -> bool:
                    try:
                        async with aiohttp.ClientSession() as http:
                            async with http.get(agent.metrics_url, headers={"Authorization": f"Bearer {token}"}) as resp:
                                return resp.status == 200
                    except (aiohttp.ClientError, OSError):
                        return False
                await wait_for(scraped, timeout=60, what="a first scrape with the Prometheus token")
                runs.append(await one_flood(cp, agent.metrics_url, token, args.tokens, [None]))
                sources = await netns.add_sources(mac, args.sources)
                runs.append(await one_flood(cp, agent.metrics_url, token, args.tokens, sources))
        finally:
            await admin.close()
            await cp.stop()
    missed = []
    print(f"{'flood':<34}  {'reviews sent (bound)':<22}  {'429s':>5}  {'scrape p50 / max during it':<28}  goal")
    for run in runs:
        name = f"{run['junk_tokens']} junk tokens, {run['sources']} source(s), {run['seconds']}s"
        ok = (run["reviews_sent"] <= run["reviews_bound"] and run["scrape_statuses"] == {"200": run["scrapes"]}
              and run["scrape_max_ms"] < SCRAPE_GOAL_MS and run["answered_during_refusals"])
        if not ok:
            missed.append(name)
        print(f"{name:<34}  {run['reviews_sent']:>5.0f} ({run['reviews_bound']:>6})       "
              f"{run['statuses'].get('429', 0):>5}  {run['scrape_p50_ms']:>6} / {run['scrape_max_ms']:>6} ms"
              f"{'':<12}  {'met' if ok else 'MISSED'}")
    out = REPO / "bench" / "results" / "review_flood.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=2))
    if missed:
        print("missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
