"""`metal-agent status` and `metal-agent logs`: look at a running agent from a terminal.

``status`` asks the agent itself (``GET /v1/services`` on its ``--listen``
address) rather than reading process records: only the agent knows states,
restarts and which spec each process serves. ``logs`` reads the per-service
llama-server log the agent writes, which exists even when the agent is down,
and that is when it is most needed.

This module is imported by every `metal-agent` invocation (the command table
is built from it), so the HTTP client (`metal_agent.cli.agent_client`, which
imports aiohttp) and the process adapters are imported by the commands that
use them, when they run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from metal_agent.core.names import is_dns1123_label, is_dns1123_subdomain
from metal_agent.core.launchd import LABEL
from metal_agent.paths import default_paths

__all__ = ["AgentUnreachable", "format_bytes", "format_duration", "format_mac", "format_table", "logs",
           "parse_service_key", "services_url", "status"]

DEFAULT_LISTEN = "127.0.0.1:9090"
_FOLLOW_INTERVAL_S = 0.25
_READ_CHUNK = 64 * 1024


def unreachable_hint() -> str:
    return f"is the agent running? launchctl print gui/{os.getuid()}/{LABEL}"


class AgentUnreachable(Exception):
    """Nothing usable answers on the agent's address; the message says what happened."""


# --- status ----------------------------------------------------------------


def services_url(listen: str) -> str:
    """The status URL for a `--listen` value; a wildcard bind is reached on loopback."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, e.g. {DEFAULT_LISTEN}, got {listen!r}")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1/services"


def format_duration(seconds: float | None) -> str:
    """Two most significant units, like kubectl's AGE: 45s, 12m3s, 3h4m, 2d5h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{s}s"
    return f"{s}s"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


COLUMNS = ("SERVICE", "STATE", "PID", "PORT", "UPTIME", "RESTARTS", "RSS", "SPEC")


def format_table(services: list[dict[str, Any]]) -> str:
    rows = [
        (
            _cell(s.get("service")) + (" (adopted)" if s.get("adopted") else ""),
            _cell(s.get("state")),
            _cell(s.get("pid")),
            _cell(s.get("port")),
            format_duration(s.get("uptime_s")),
            _cell(s.get("restarts")),
            format_bytes(s.get("rss_bytes")),
            _cell(s.get("spec_hash")),
        )
        for s in services
    ]
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [COLUMNS, *rows])


ROUTE_COLUMNS = ("SERVICE", "PORT", "STATE", "INFLIGHT", "QUEUED")


def format_routes(routes: list[dict[str, Any]]) -> str:
    """One row per front-door route: its stable port, its state, requests in flight and held."""
    rows = [tuple(_cell(r.get(k)) for k in ("service", "port", "state", "inflight", "queued")) for r in routes]
    widths = [max(len(r[i]) for r in [ROUTE_COLUMNS, *rows]) for i in range(len(ROUTE_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [ROUTE_COLUMNS, *rows])


def format_mac(mac: dict[str, Any]) -> str:
    """The Mac itself: the no-idle-sleep assertion, the GPU's wired-memory ceiling, the thermal state."""
    sleep = mac.get("sleep_assertion") or {}
    if sleep.get("held"):
        held = f"held (caffeinate pid {sleep.get('pid')}, --prevent-sleep={sleep.get('mode')})"
    else:
        held = f"not held (--prevent-sleep={sleep.get('mode', '?')})"
        if sleep.get("problem"):
            held += f": {sleep['problem']}"
    wired, thermal = mac.get("wired_limit"), mac.get("thermal")
    return "\n".join([
        f"sleep assertion: {held}",
        f"GPU wired-memory ceiling: {format_bytes(wired.get('bytes'))} ({wired.get('source')})"
        if isinstance(wired, dict) else "GPU wired-memory ceiling: unknown (not read on this host)",
        f"thermal: {thermal.get('state')}" if isinstance(thermal, dict) else "thermal: unknown (pmset -g therm not read)",
    ])


def status(
    listen: Annotated[str, typer.Option(envvar="METAL_AGENT_LISTEN", help="The agent's --listen address.")] = DEFAULT_LISTEN,
    as_json: Annotated[bool, typer.Option("--json", help="Print the agent's answer as JSON.")] = False,
) -> None:
    """Show the llama-servers the running agent manages."""
    from metal_agent.cli.agent_client import fetch_services

    try:
        payload = asyncio.run(fetch_services(listen))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--listen") from None
    except AgentUnreachable as exc:
        typer.echo(f"error: {exc}\n{unreachable_hint()}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    services = payload["services"]
    if not services:
        typer.echo(f"the agent (version {payload.get('version', '?')}) manages no llama-servers")
    else:
        typer.echo(format_table(services))
    if isinstance(payload.get("mac"), dict):
        typer.echo("\n" + format_mac(payload["mac"]))
    if payload.get("routes"):  # the front door is on (--front-door)
        typer.echo("\nfront door\n" + format_routes(payload["routes"]))


# --- logs ------------------------------------------------------------------


def parse_service_key(value: str) -> str:
    """`namespace/name` with Kubernetes' name rules, so the log path cannot escape the log dir."""
    namespace, sep, name = value.partition("/")
    if not sep:
        raise ValueError(f"expected NAMESPACE/NAME, got {value!r}")
    if not is_dns1123_label(namespace):
        raise ValueError(f"{namespace!r} is not a valid namespace (lower-case letters, digits and '-')")
    if not is_dns1123_subdomain(name):
        raise ValueError(f"{name!r} is not a valid name (lower-case letters, digits, '-' and '.')")
    return f"{namespace}/{name}"


def _tail(path: Path, lines: int) -> tuple[bytes, int, int]:
    """The last `lines` lines of the file, the offset they end at, and its inode."""
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        end = st.st_size
        if lines <= 0:
            return b"", end, st.st_ino
        pos, data = end, b""
        # One more newline than lines wanted, unless the file's last line is unterminated.
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(_READ_CHUNK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
        body = data[:-1] if data.endswith(b"\n") else data
        kept = body.split(b"\n")[-lines:]
        text = b"\n".join(kept) + (b"\n" if data.endswith(b"\n") else b"")
        return text, end, st.st_ino


def _read_range(path: Path, offset: int) -> tuple[bytes, int, int] | None:
    """Bytes after `offset`, the new offset and the inode; None if the file is gone.

    A file smaller than `offset` was truncated (copy-truncate rotation, as
    the agent does it): start again from its beginning.
    """
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size < offset:
                offset = 0
            f.seek(offset)
            data = f.read(st.st_size - offset)
            return data, offset + len(data), st.st_ino
    except FileNotFoundError:
        return None


def _emit(data: bytes) -> None:
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


async def _follow(path: Path, offset: int, inode: int) -> None:
    """Print what is appended, forever; handles copy-truncate and rename rotation.

    Polls the file (a stat and a read every quarter second) rather than
    using inotify/kqueue: simple, portable, and cheap at this rate.
    """
    while True:
        await asyncio.sleep(_FOLLOW_INTERVAL_S)
        result = await asyncio.to_thread(_read_range, path, offset)
        if result is None:
            continue  # renamed away; wait for the writer to create it again
        data, new_offset, new_inode = result
        if new_inode != inode:  # replaced by a new file: read it from the start
            result = await asyncio.to_thread(_read_range, path, 0)
            if result is None:
                continue
            data, new_offset, new_inode = result
        _emit(data)
        offset, inode = new_offset, new_inode


def logs(
    service: Annotated[str, typer.Argument(metavar="NAMESPACE/NAME", help="The InferenceService.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as the log grows.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many lines from the end to print first.")] = 100,
    log_dir: Annotated[Path | None, typer.Option(envvar="METAL_AGENT_LOG_DIR", help="The agent's --log-dir (default: the platform's).")] = None,
) -> None:
    """Print the llama-server log of one InferenceService."""
    from metal_agent.adapters.process.manager import log_file_name

    try:
        key = parse_service_key(service)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAMESPACE/NAME") from None
    path = (log_dir or default_paths().logs) / log_file_name(key)
    try:
        text, offset, inode = _tail(path, lines)
    except FileNotFoundError:
        typer.echo(
            f"error: no log for {key} at {path}: the agent writes it when it first starts that service "
            "(`metal-agent status` lists the services it manages)",
            err=True,
        )
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"error: cannot read {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    _emit(text)
    if not follow:
        return
    try:
        asyncio.run(_follow(path, offset, inode))
    except KeyboardInterrupt:
        pass
