"""`metal-agent status` and `metal-agent logs`, through the same command table a user runs.

`status` talks HTTP to the agent; here a small aiohttp server stands in for
the agent's `/v1/services` endpoint (the client side is what is under test;
the full agent is exercised by the control-loop tests). Commands run
in-process through typer's runner; only `logs -f`, which runs until it is
signalled, runs as a real process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
from aiohttp import web
from typer.testing import CliRunner

from metal_agent.cli.main import app
from metal_agent.cli.status import format_bytes, format_duration, parse_service_key
from tests.support.ports import free_port

TIMEOUT = 30  # seconds; generous, the machine may be busy

PAYLOAD = {
    "version": "0.1.0",
    "services": [
        {"service": "llm/qwen", "state": "Ready", "pid": 4242, "port": 40001, "uptime_s": 3725.4, "restarts": 2,
         "rss_bytes": 1288490189, "spec_hash": "abcdef123456", "adopted": True},
        {"service": "llm/tiny", "state": "Starting", "pid": None, "port": None, "uptime_s": None, "restarts": 0,
         "rss_bytes": None, "spec_hash": "0123456789ab", "adopted": False},
    ],
}


@asynccontextmanager
async def agent_endpoint(payload: object, status: int = 200) -> AsyncIterator[str]:
    """A stand-in for the agent's HTTP endpoint; yields its --listen address."""

    async def services(_: web.Request) -> web.Response:
        return web.json_response(payload, status=status)

    application = web.Application()
    application.router.add_get("/v1/services", services)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


async def cli(*args: str) -> tuple[int, str, str]:
    """The command in-process, on a worker thread: it runs its own event loop (asyncio.run),
    while the stand-in agent keeps serving on this test's loop."""
    result = await asyncio.wait_for(asyncio.to_thread(invoke, *args), TIMEOUT)
    return result.exit_code, result.stdout, result.stderr


# --- status ------------------------------------------------------------------


async def test_status_table():
    async with agent_endpoint(PAYLOAD) as listen:
        rc, out, err = await cli("status", "--listen", listen)
    assert rc == 0, err
    header, qwen, tiny = out.splitlines()
    assert header.split() == ["SERVICE", "STATE", "PID", "PORT", "UPTIME", "RESTARTS", "RSS", "SPEC"]
    assert qwen.split() == ["llm/qwen", "(adopted)", "Ready", "4242", "40001", "1h2m", "2", "1.2", "GiB", "abcdef123456"]
    assert tiny.split() == ["llm/tiny", "Starting", "-", "-", "-", "0", "-", "0123456789ab"]
    assert qwen.index("Ready") == header.index("STATE")  # columns line up


async def test_status_shows_the_front_doors_routes_when_it_is_on():
    payload = {**PAYLOAD, "routes": [
        {"service": "llm/qwen", "port": 31234, "state": "serving", "upstream": "127.0.0.1:40001", "inflight": 3,
         "queued": 5},
        {"service": "llm/tiny", "port": 31235, "state": "starting", "upstream": None, "inflight": None,
         "queued": None}]}
    async with agent_endpoint(payload) as listen:
        rc, out, err = await cli("status", "--listen", listen)
    assert rc == 0, err
    lines = out.splitlines()
    start = lines.index("front door")
    assert lines[start + 1].split() == ["SERVICE", "PORT", "STATE", "INFLIGHT", "QUEUED"]
    assert lines[start + 2].split() == ["llm/qwen", "31234", "serving", "3", "5"]
    assert lines[start + 3].split() == ["llm/tiny", "31235", "starting", "-", "-"]
    async with agent_endpoint(PAYLOAD) as listen:  # front door off: no such section
        rc, out, _ = await cli("status", "--listen", listen)
    assert "front door" not in out


async def test_status_json_and_empty():
    async with agent_endpoint(PAYLOAD) as listen:
        rc, out, err = await cli("status", "--listen", listen, "--json")
    assert rc == 0, err
    assert json.loads(out) == PAYLOAD
    async with agent_endpoint({"version": "0.1.0", "services": []}) as listen:
        rc, out, _ = await cli("status", "--listen", listen)
    assert rc == 0 and "manages no llama-servers" in out


async def test_status_something_else_answers():
    async with agent_endpoint({"error": "nope"}, status=404) as listen:
        rc, _, err = await cli("status", "--listen", listen)
    assert rc == 1
    assert "HTTP 404" in err and "not a metal-agent?" in err


def test_status_agent_unreachable():
    result = invoke("status", "--listen", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 1
    assert f"is the agent running? launchctl print gui/{os.getuid()}/com.llmkube.metal-agent" in result.stderr


def test_status_bad_listen():
    result = invoke("status", "--listen", "localhost")
    assert result.exit_code == 2 and "host:port" in result.stderr


@pytest.mark.parametrize("seconds,shown", [(None, "-"), (0.4, "0s"), (59, "59s"), (61, "1m1s"), (3725, "1h2m"),
                                           (2 * 86400 + 5 * 3600 + 7, "2d5h")])
def test_format_duration(seconds, shown):
    assert format_duration(seconds) == shown


@pytest.mark.parametrize("n,shown", [(None, "-"), (512, "512 B"), (2048, "2.0 KiB"), (300 * 2**20, "300.0 MiB"),
                                     (int(1.5 * 2**30), "1.5 GiB"), (3 * 2**40, "3.0 TiB")])
def test_format_bytes(n, shown):
    assert format_bytes(n) == shown


# --- logs --------------------------------------------------------------------


def write_log(log_dir: Path, key: str, text: str) -> Path:
    path = log_dir / (key.replace("/", "__") + ".log")
    path.write_text(text)
    return path


def test_logs_prints_last_lines(tmp_path: Path):
    write_log(tmp_path, "llm/qwen", "".join(f"line {i}\n" for i in range(1, 1001)))
    result = invoke("logs", "llm/qwen", "--log-dir", str(tmp_path), "--lines", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout == "line 998\nline 999\nline 1000\n"
    result = invoke("logs", "llm/qwen", "--log-dir", str(tmp_path), "-n", "5000")
    assert result.stdout.count("\n") == 1000 and result.stdout.startswith("line 1\n")


def test_logs_unterminated_last_line(tmp_path: Path):
    write_log(tmp_path, "llm/qwen", "a\nb\npartial")
    result = invoke("logs", "llm/qwen", "--log-dir", str(tmp_path), "--lines", "2")
    assert result.stdout == "b\npartial"


@pytest.mark.parametrize("name", ["../x", "llm/../x", "llm/..", "llm", "llm/a/b", "LLM/a", "llm/", "/a", "llm/a_b"])
def test_logs_rejects_bad_names(tmp_path: Path, name: str):
    result = invoke("logs", name, "--log-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    with pytest.raises(ValueError):
        parse_service_key(name)


def test_logs_missing(tmp_path: Path):
    result = invoke("logs", "llm/nope", "--log-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "no log for llm/nope" in result.stderr and "metal-agent status" in result.stderr


async def test_logs_follow_survives_copy_truncate(tmp_path: Path):
    log = write_log(tmp_path, "llm/qwen", "old 1\nold 2\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "metal_agent", "logs", "llm/qwen", "-f", "--lines", "1", "--log-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def next_line() -> str:
        return (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode()

    try:
        assert await next_line() == "old 2\n"  # the tail is printed: following starts from here
        with log.open("a") as f:
            f.write("new 1\nnew 2\n")
        assert [await next_line(), await next_line()] == ["new 1\n", "new 2\n"]
        shutil.copyfile(log, log.with_name(log.name + ".1"))  # copy-truncate, as the agent rotates
        with log.open("r+") as f:
            f.truncate(0)
        with log.open("a") as f:
            f.write("rotated\n")
        assert await next_line() == "rotated\n"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), TIMEOUT)
