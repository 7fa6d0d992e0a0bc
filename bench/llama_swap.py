"""llama-swap beside the front door (issue 21): same tiny GGUF, same llama-server, same machine, same run.

llama-swap (mostlygeek/llama-swap, built from ../shared/vendor by scripts/build-llama-swap.sh) is the
on-demand model swapper people put in front of llama-server today. bench/front_door.py runs this
section after its own, so the two never compete for the CPU:

  proxy overhead  a 1-token chat completion, one keep-alive client, direct to the llama-server
                  llama-swap started vs through llama-swap, alternating rounds: added p50/p95/p99
  swap time       a request for the model that is not loaded (two models in llama-swap's default
                  one-at-a-time group, so each request stops one llama-server and starts the other)
                  -> its response head; p50/p95
  engine start    llama-server alone: spawn -> first /health 200 (polled every 5 ms), and -> the
                  response head of a completion sent straight to it then, p50/p95
  ours, held      the front door holding a request on a route whose engine is down while the same
                  llama-server starts on that port (a crash restart on the same port: the engine is
                  spawned as the request is sent) -> its response head; and a route the table marks
                  starting, released by the table pushed at the engine's first /health 200 (the
                  agent's respawn path, its readiness probe replaced by the 5 ms poll)
  idle RSS        llama-swap's resident memory after its runs, beside the front door's

On-demand loading by the agent itself is another change (issue 21 item 3); `ours_on_demand_ms` is
left None here for its bench to fill.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from bench.control_loop import pct
from bench.goals import Figure, shown_only
from tests.support.front_door import route, table
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess
from tests.support.wait import wait_for

MS = 1000.0


def _body(model: str | None) -> bytes:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    if model:
        body["model"] = model
    return json.dumps(body).encode()


def _latencies(port: int, n: int, model: str | None) -> list[float]:
    """`n` 1-token completions on one keep-alive connection; seconds each."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body, out = _body(model), []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - t0)
            if resp.status != 200:
                raise RuntimeError(f"port {port}: status {resp.status}")
    finally:
        conn.close()
    return out


def _first_head(port: int, model: str | None, timeout: float = 120) -> float:
    """Send one 1-token completion on a fresh connection; the perf_counter when its response head came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", _body(model), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        head = time.perf_counter()
        text = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"port {port}: status {resp.status}: {text[:200]!r}")
        return head
    finally:
        conn.close()


def _health_200(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except OSError:
        return False
    finally:
        conn.close()


async def _until_healthy(port: int, started: float, timeout: float = 60) -> float:
    """Poll /health every 5 ms; seconds from `started` (perf_counter) to the first 200."""
    deadline = started + timeout
    while not await asyncio.to_thread(_health_200, port):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"llama-server on {port} not healthy after {timeout} s")
        await asyncio.sleep(0.005)  # the poll's cadence is what is measured against, not a wait for state
    return time.perf_counter() - started


def _config(llama_bin: Path, model: Path, ports: dict[str, int], engine_args: list[str]) -> str:
    models = {}
    for name, port in ports.items():
        argv = [str(llama_bin), "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *engine_args]
        models[name] = {"cmd": " ".join(argv), "proxy": f"http://127.0.0.1:{port}", "ttl": 0}
    return json.dumps({"healthCheckTimeout": 60, "models": models})  # YAML is a superset of JSON


async def _spawned(name: str, argv: list[str], log: Path, run: Callable[[ManagedProcess], Awaitable[Any]]) -> Any:
    process = ManagedProcess(name, argv, log)
    await process.start()
    try:
        return await run(process)
    finally:
        await process.stop(grace=5)


async def engine_start(llama_argv: Callable[[int], list[str]], tmp: Path, runs: int) -> tuple[list[float], list[float]]:
    """llama-server alone: spawn -> first /health 200, and spawn -> the response head of a completion
    sent straight to it at that moment (what the front door's held request is measured against)."""
    healthy, answered = [], []

    async def run(_p, port: int, started: float) -> None:
        healthy.append(await _until_healthy(port, started))
        answered.append(await asyncio.to_thread(_first_head, port, None) - started)

    for i in range(runs):
        port = free_port()
        started = time.perf_counter()
        await _spawned("llama-server", llama_argv(port), tmp / f"start-{i}.log",
                       lambda p, port=port, started=started: run(p, port, started))
    return healthy, answered


async def _held_request(door, listen: int) -> asyncio.Future:
    """A request sent to the route on `listen`, once the front door is holding it."""
    request = asyncio.ensure_future(asyncio.to_thread(_first_head, listen, None))
    await wait_for(lambda: _holding(door), timeout=30, what="the request held by the front door")
    return request


async def _holding(door) -> bool:
    state = await door.route_state("bench/cold")
    return state.get("queued", 0) + state.get("inflight", 0) >= 1


async def ours_held(door, llama_argv: Callable[[int], list[str]], tmp: Path, runs: int,
                    version: int) -> tuple[list[float], list[float], int]:
    """The front door holding a request while its engine starts, engine spawn -> response head:
    (on a refused port, the engine started there; on a starting route released by the table at the
    engine's first /health 200), and the last table version pushed."""
    refused, released = [], []
    for i in range(runs):
        engine, listen = free_port(), free_port()
        version += 1
        await door.put_table(table(version, [route("bench/cold", listen, f"127.0.0.1:{engine}", queue_timeout_s=60)]))
        request = await _held_request(door, listen)
        started = time.perf_counter()
        head = await _spawned("llama-server", llama_argv(engine), tmp / f"held-{i}.log", lambda _p: request)
        refused.append(head - started)

        engine, listen = free_port(), free_port()
        version += 1
        await door.put_table(table(version, [route("bench/cold", listen, None, state="starting", queue_timeout_s=60)]))
        request = await _held_request(door, listen)
        version += 1

        async def release(_p, engine=engine, listen=listen, request=request, version=version) -> float:
            await _until_healthy(engine, started)
            await door.put_table(table(version, [route("bench/cold", listen, f"127.0.0.1:{engine}",
                                                       queue_timeout_s=60)]))
            return await request

        started = time.perf_counter()
        head = await _spawned("llama-server", llama_argv(engine), tmp / f"released-{i}.log", release)
        released.append(head - started)
    return refused, released, version


async def _rounds(direct: int, via: int, n: int, model: str, rounds: int = 10) -> tuple[list[float], list[float]]:
    await asyncio.to_thread(_latencies, direct, 100, model)
    await asyncio.to_thread(_latencies, via, 100, model)
    d: list[float] = []
    f: list[float] = []
    for _ in range(rounds):
        d += await asyncio.to_thread(_latencies, direct, n // rounds, model)
        f += await asyncio.to_thread(_latencies, via, n // rounds, model)
    return d, f


async def _swaps(listen: int, runs: int) -> list[float]:
    """Alternate the two models: each request finds the other one loaded."""
    out = []
    for i in range(runs):
        sent = time.perf_counter()
        out.append(await asyncio.to_thread(_first_head, listen, "tiny-b" if i % 2 == 0 else "tiny-a") - sent)
    return out


def _rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def llama_swap_side(swap_bin: Path, llama_bin: Path, model: Path, engine_args: list[str],
                          requests: int, swaps: int) -> dict[str, Any]:
    """llama-swap's overhead, swap time and idle RSS, with two models of the tiny GGUF."""
    ports = {"tiny-a": free_port(), "tiny-b": free_port()}
    listen = free_port()
    with tempfile.TemporaryDirectory(prefix="llama-swap-bench-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(_config(llama_bin, model, ports, engine_args))
        process = ManagedProcess("llama-swap", [str(swap_bin), "-config", str(config), "-listen",
                                                f"127.0.0.1:{listen}"], Path(tmp) / "llama-swap.log")
        await process.start()
        children: list[psutil.Process] = []
        try:
            await wait_for(lambda: asyncio.to_thread(_get_ok, listen, "/health"), timeout=30,
                           what="llama-swap's /health", on_timeout=process.tail)
            rss_fresh = _rss_mib(process.pid)
            await asyncio.to_thread(_first_head, listen, "tiny-a")  # loads tiny-a
            children = psutil.Process(process.pid).children(recursive=True)
            direct, via = await _rounds(ports["tiny-a"], listen, requests, "tiny-a")
            swap = await _swaps(listen, swaps)
            children += psutil.Process(process.pid).children(recursive=True)
            rss_after = _rss_mib(process.pid)
        finally:
            await process.stop(grace=10)
            for child in children:  # its engines run in process groups of their own
                if child.is_running():  # psutil checks the start time too: the same process, not its pid
                    child.kill()
    return {
        "requests": len(via),
        "direct_ms": _pcts(direct), "through_ms": _pcts(via),
        "added_ms": {q: _pcts(via)[q] - _pcts(direct)[q] for q in ("p50", "p95", "p99")},
        "swap_ms": _pcts(swap), "swaps": len(swap),
        "rss_mib": {"fresh": rss_fresh, "after": rss_after},
    }


def _get_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _pcts(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5) * MS, "p95": pct(values, 0.95) * MS, "p99": pct(values, 0.99) * MS,
            "mean": statistics.fmean(values) * MS}


def figures(r: dict[str, Any], front_door: dict[str, Any]) -> list[Figure]:
    """The side-by-side rows; shown, not judged (the front door's own goals are judged above)."""
    ls, ours, start = r["llama_swap"], r["ours"], r["engine_start_ms"]

    def p50_p95(ms: dict[str, float]) -> str:
        return f"{ms['p50']:.0f} / {ms['p95']:.0f} ms"

    rows = [shown_only("llama-server alone starts p50 / p95", p50_p95(start)),
            shown_only("llama-server alone: spawn -> first answer", p50_p95(r["engine_first_answer_ms"])),
            shown_only("front door held, refused port: spawn -> head", p50_p95(ours["refused_port_ms"])),
            shown_only("front door held, released by table: spawn -> head", p50_p95(ours["released_by_table_ms"]))]
    if ls is None:
        return [*rows, shown_only("llama-swap", "skipped: not built (scripts/build-llama-swap.sh)")]
    added = ls["added_ms"]
    return [
        shown_only("llama-swap added p50 / p95 / p99", f"{added['p50']:.3f} / {added['p95']:.3f} / {added['p99']:.3f} ms"),
        shown_only("front door added p50 / p99 (same run)",
                   f"{front_door['added_ms']['p50']:.3f} / {front_door['added_ms']['p99']:.3f} ms"),
        *rows,
        shown_only("llama-swap swap: request -> head", p50_p95(ls["swap_ms"])),
        shown_only("llama-swap RSS fresh / after its run", f"{ls['rss_mib']['fresh']:.1f} / {ls['rss_mib']['after']:.1f} MiB"),
        shown_only("front door RSS after its run", f"{front_door['rss_mib']:.1f} MiB"),
    ]


async def side_by_side(door, llama_bin: Path, model: Path, engine_args: list[str], requests: int,
                       runs: int, version: int, swap_bin: Path | None) -> dict[str, Any]:
    """Everything above, in order; `door` is the running front door (its table is replaced)."""
    with tempfile.TemporaryDirectory(prefix="fd-cold-") as tmp:
        def argv(port: int) -> list[str]:
            return [str(llama_bin), "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *engine_args]

        start, first_answer = await engine_start(argv, Path(tmp), runs)
        refused, released, version = await ours_held(door, argv, Path(tmp), runs, version)
    result: dict[str, Any] = {
        "engine_start_ms": _pcts(start),
        "engine_first_answer_ms": _pcts(first_answer),
        "ours": {"refused_port_ms": _pcts(refused), "released_by_table_ms": _pcts(released),
                 "ours_on_demand_ms": None},
        "llama_swap": None,
    }
    if swap_bin is not None:
        result["llama_swap"] = await llama_swap_side(swap_bin, llama_bin, model, engine_args, requests, runs * 2)
    return result
