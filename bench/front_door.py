"""The front door's cost, same machine, same run: direct to llama-server vs through it.

Runs the real llama-server on the tiny GGUF and the real front door process
(`metal-agent front-door`), pushes a one-route table over its socket, then:

  added latency   a 1-token chat completion, one keep-alive client, direct and
                  through the route's port in alternating rounds; p50/p99 of each
                  and the difference (goal <= 0.3 ms p50, <= 2 ms p99)
  streaming       one long SSE completion (ignore_eos), tokens/s through / direct
                  (goal >= 99 %)
  64 streams      64 concurrent streaming completions; failed requests (goal 0),
                  wall time through vs direct
  CPU/request     the front door's CPU seconds over the latency run / requests
  RSS idle        the front door's resident memory after the run
  side by side    llama-swap on the same model and engine (bench/llama_swap.py): its added latency,
                  swap time and idle RSS beside the front door's, and the front door holding a
                  request while an engine starts (--no-side-by-side skips it)

    .venv/bin/python bench/front_door.py [--requests 2000] [--stream-tokens 2000] [--side-runs 20]

Prints a table, writes bench/results/front_door.json; exits 1 on a missed goal.
The client is a plain blocking `http.client` loop on a worker thread: its own
cost is the same on both paths, so the difference is the front door's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.assets import cached  # noqa: E402
from bench.control_loop import pct  # noqa: E402
from bench import llama_swap  # noqa: E402
from bench.goals import at_most, check, report, shown_only  # noqa: E402
from tests.support import tiny_model  # noqa: E402
from tests.support.front_door import route, running_front_door, table  # noqa: E402
from tests.support.llama import running_llama_server  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.procs import ManagedProcess  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

STUB_BODY = b'{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"x"}}]}'
STUB_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(STUB_BODY) + STUB_BODY)


async def _stub_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An engine that answers at once: isolates the front door's own cost from the model's."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(STUB_RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def stub_serve(port: int) -> None:
    server = await asyncio.start_server(_stub_conn, "127.0.0.1", port)
    await server.serve_forever()


ONE_TOKEN = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def _latencies(port: int, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", ONE_TOKEN, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - t0)
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
    finally:
        conn.close()
    return out


async def bench_latency(direct: int, via: int, n: int, rounds: int = 10) -> tuple[list[float], list[float]]:
    await asyncio.to_thread(_latencies, direct, 100)
    await asyncio.to_thread(_latencies, via, 100)
    d: list[float] = []
    f: list[float] = []
    for _ in range(rounds):
        d += await asyncio.to_thread(_latencies, direct, n // rounds)
        f += await asyncio.to_thread(_latencies, via, n // rounds)
    return d, f


async def _stream(http: aiohttp.ClientSession, port: int, tokens: int) -> tuple[int, float]:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    count = 0
    done = False
    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: {") and b'"finish_reason":null' in line:
                count += 1  # one event per generated token (the first carries the role)
    if not done:
        raise RuntimeError(f"the stream ended without [DONE] after {count} events")
    return count, time.perf_counter() - t0


def _stream_blocking(port: int, tokens: int) -> float:
    """Tokens/s of one long streaming completion, read line by line by a plain blocking client."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
                       "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        count = 0
        while line := resp.readline():
            if line.startswith(b"data: [DONE]"):
                return count / (time.perf_counter() - t0)
            if line.startswith(b"data: {") and b'"finish_reason":null' in line:
                count += 1
        raise RuntimeError(f"the stream on port {port} ended without [DONE] after {count} events")
    finally:
        conn.close()


async def bench_stream(direct: int, via: int, tokens: int, rounds: int = 6) -> tuple[float, float]:
    rates: dict[int, list[float]] = {direct: [], via: []}
    for i in range(rounds):
        for port in ((direct, via) if i % 2 == 0 else (via, direct)):  # neither path always goes first
            rates[port].append(await asyncio.to_thread(_stream_blocking, port, tokens))
    return statistics.median(rates[direct]), statistics.median(rates[via])


async def bench_concurrent(http, port: int, streams: int, tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_stream(http, port, tokens) for _ in range(streams)), return_exceptions=True)
    bad = [r for r in results if isinstance(r, BaseException)]
    for r in bad[:3]:
        print(f"  failed stream on port {port}: {r!r}", file=sys.stderr)
    failed = len(bad)
    return failed, time.perf_counter() - t0


def _figures(r: dict, streams: int) -> list:
    """The table: what was measured, against the goals of issue 21."""
    stream = r["stream_tokens_per_s"]
    return [
        shown_only("1-token completion direct p50 / p99", f"{r['direct_ms']['p50']:.3f} / {r['direct_ms']['p99']:.3f} ms"),
        shown_only("through the front door p50 / p99", f"{r['through_ms']['p50']:.3f} / {r['through_ms']['p99']:.3f} ms"),
        at_most("added latency p50 (ms)", round(r["added_ms"]["p50"], 3), 0.3),
        at_most("added latency p99 (ms)", round(r["added_ms"]["p99"], 3), 2.0),
        check("streaming tokens/s through / direct", f"{stream['ratio'] * 100:.1f} % "
              f"({stream['through']:.0f} / {stream['direct']:.0f})", ">= 99 %", stream["ratio"] >= 0.99),
        at_most(f"{streams} concurrent streams: failed through", r["concurrent_streams"]["failed_through"], 0),
        shown_only(f"{streams} streams wall time direct / through", f"{r['concurrent_streams']['wall_s_direct']:.2f} / {r['concurrent_streams']['wall_s_through']:.2f} s"),
        shown_only("added vs an instant stub engine p50 / p99", f"{r['stub_engine_ms']['added_p50']:.3f} / "
                   f"{r['stub_engine_ms']['added_p99']:.3f} ms"),
        shown_only("front door CPU per request", f"{r['cpu_ms_per_request']:.3f} ms"),
        shown_only("load average (1 min) before / after", f"{r['load_average']['before']:.2f} / {r['load_average']['after']:.2f}"),
        shown_only("front door RSS after the run", f"{r['rss_mib']:.1f} MiB"),
    ]


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def _llama_swap_bin() -> Path | None:
    """llama-swap as `make dev` built it; None (its rows say skipped) where no source was vendored."""
    try:
        return cached("build-llama-swap.sh") / "llama-swap"
    except SystemExit as missing:
        print(f"llama-swap: {missing}; its side-by-side rows are skipped", file=sys.stderr)
        return None


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stream-tokens", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--side-runs", type=int, default=20, help="engine starts per side-by-side figure")
    parser.add_argument("--no-side-by-side", action="store_true", help="skip llama-swap and the held-start figures")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "front_door.json")
    parser.add_argument("--stub-serve", type=int, help=argparse.SUPPRESS)  # internal: run the stub engine
    args = parser.parse_args()
    if args.stub_serve:
        await stub_serve(args.stub_serve)
        return 0
    load_before = os.getloadavg()[0]
    llama_bin = cached("build-llama-server.sh")
    model = tiny_model.ensure_model(tiny_model.DEFAULT, llama_bin.parent.parent / "models" / "ggml-vocab-llama-spm.gguf")
    engine_port, door_port = free_port(), free_port()
    engine_args = ["--ctx-size", "16384", "--threads", "1", "--parallel", "4"]
    argv = [str(llama_bin), "--model", str(model), "--host", "127.0.0.1", "--port", str(engine_port), *engine_args]
    side = None
    stub_port, stub_door_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="fd-bench-") as tmp:
        stub = ManagedProcess("stub-engine", [sys.executable, __file__, "--stub-serve", str(stub_port)],
                              Path(tmp) / "stub.log")
        await stub.start()
        try:
            await wait_for(lambda: _listening(stub_port), timeout=30, what="the stub engine to listen")
            async with running_llama_server(argv, port=engine_port) as _engine, running_front_door(Path(tmp)) as door:
                status, text = await door.put_table(table(1, [
                    route("bench/tiny", door_port, f"127.0.0.1:{engine_port}", max_inflight=4, queue=128,
                          queue_timeout_s=120),
                    route("bench/stub", stub_door_port, f"127.0.0.1:{stub_port}", max_inflight=4)]))
                if status != 204:
                    raise SystemExit(f"the front door refused the table: {text}")
                proc = psutil.Process(door.process.pid)
                stub_direct, stub_via = await bench_latency(stub_port, stub_door_port, args.requests)
                cpu0 = sum(proc.cpu_times()[:2])
                direct, via = await bench_latency(engine_port, door_port, args.requests)
                cpu_per_request = (sum(proc.cpu_times()[:2]) - cpu0) / (len(via) + 100)
                # A fresh connection per stream on both paths: llama-server drops idle keep-alive
                # connections on its own schedule, which would fail a reused one at random.
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                                 connector=aiohttp.TCPConnector(force_close=True, limit=0)) as http:
                    rate_direct, rate_via = await bench_stream(engine_port, door_port, args.stream_tokens)
                    failed_direct, wall_direct = await bench_concurrent(http, engine_port, args.streams, 64)
                    failed_via, wall_via = await bench_concurrent(http, door_port, args.streams, 64)
                rss = proc.memory_info().rss
                for line in door.log().splitlines():
                    if "broke" in line or "refused" in line:
                        print(f"  front door log: {line}", file=sys.stderr)
                if not args.no_side_by_side:  # after the front door's own figures: nothing else runs meanwhile
                    side = await llama_swap.side_by_side(door, llama_bin, model, engine_args, args.requests,
                                                         args.side_runs, 1, _llama_swap_bin())
        finally:  # a failed run must not leave the stub engine behind
            await stub.stop()
    ms = 1000.0
    results = {
        "requests": len(via),
        "direct_ms": {"p50": pct(direct, 0.5) * ms, "p99": pct(direct, 0.99) * ms},
        "through_ms": {"p50": pct(via, 0.5) * ms, "p99": pct(via, 0.99) * ms},
        "added_ms": {"p50": (pct(via, 0.5) - pct(direct, 0.5)) * ms, "p99": (pct(via, 0.99) - pct(direct, 0.99)) * ms},
        "stream_tokens_per_s": {"direct": rate_direct, "through": rate_via, "ratio": rate_via / rate_direct},
        "concurrent_streams": {"streams": args.streams, "failed_direct": failed_direct, "failed_through": failed_via,
                               "wall_s_direct": wall_direct, "wall_s_through": wall_via},
        "stub_engine_ms": {"direct_p50": pct(stub_direct, 0.5) * ms, "through_p50": pct(stub_via, 0.5) * ms,
                           "added_p50": (pct(stub_via, 0.5) - pct(stub_direct, 0.5)) * ms,
                           "added_p99": (pct(stub_via, 0.99) - pct(stub_direct, 0.99)) * ms},
        "cpu_ms_per_request": cpu_per_request * ms,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "rss_mib": rss / 2**20,
        "side_by_side": side,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    figures = _figures(results, args.streams)
    if side is not None:
        figures += llama_swap.figures(side, results)
    code = report(figures)
    print(f"written to {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
