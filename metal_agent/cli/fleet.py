"""`metal-agent fleet`, `drain` and `uncordon`: this Mac's fleet, asked of the running agent.

They talk to the agent's local API (`--listen`, loopback) like `status`: the
agent holds the fleet's picture (every member's Lease, who holds which
replica) and is the one that must hand replicas over, so the commands ask it
rather than the cluster. aiohttp is imported only when a command runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import typer

from metal_agent.cli.status import DEFAULT_LISTEN, AgentUnreachable, format_bytes, services_url, unreachable_hint

__all__ = ["drain", "fleet", "uncordon"]

NOT_DRAINED = 3  # exit code: the agent answered, but replicas are still served here (1: no agent, or no fleet)
ListenOption = Annotated[str, typer.Option(envvar="METAL_AGENT_LISTEN", help="The agent's --listen address.")]


def _url(listen: str, path: str) -> str:
    try:
        base = services_url(listen).removesuffix("/v1/services")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--listen") from None
    return base + path


async def _call(listen: str, path: str, method: str = "GET") -> dict[str, Any]:
    """One request to the agent. A verb is a POST with a JSON body: the agent refuses any other
    content type (a web page could send one; core/request_guard.py)."""
    import aiohttp

    url = _url(listen, path)
    body = {"json": {}} if method != "GET" else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.request(method, url, headers={"Accept": "application/json"}, **body) as response:
                if response.status == 404:
                    raise AgentUnreachable(f"the agent at {listen} does not run with --fleet")
                if response.status == 403:
                    raise AgentUnreachable(f"{url} refused the request: {await _why(response)}")
                if response.status != 200:
                    raise AgentUnreachable(f"{url} answered HTTP {response.status}")
                return await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise AgentUnreachable(f"no agent answers at {url} ({type(exc).__name__}: {exc or 'timed out'})") from None


async def _why(response) -> str:
    try:
        return str((await response.json(content_type=None)).get("error") or response.reason)
    except (ValueError, AttributeError):
        return str(response.reason)


def _run(coro):
    try:
        return asyncio.run(coro)
    except AgentUnreachable as exc:
        typer.echo(f"error: {exc}\n{unreachable_hint()}", err=True)
        raise typer.Exit(1) from None


def columns(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def fleet_rows(view: dict) -> list[list[str]]:
    rows = [["MEMBER", "HEALTH", "CHIP", "FREE", "BUDGET", "HOLDS", "READY"]]
    for m in view["members"]:
        health = "cordoned" if m["cordoned"] else "ok"
        if not m["alive"]:
            health = "fenced" if m["member"] == view["member"] else "expired"
        rows.append([m["member"] + (" (this Mac)" if m["member"] == view["member"] else ""), health,
                     m["chip"] or "-", format_bytes(m["free_bytes"]), format_bytes(m["budget_bytes"]),
                     ", ".join(m["holds"]) or "-", str(len(m["ready"]))])
    return rows


def fleet(listen: ListenOption = DEFAULT_LISTEN,
          as_json: Annotated[bool, typer.Option("--json", help="Print the agent's answer as JSON.")] = False) -> None:
    """Show the Macs of the fleet: health, what each holds and serves, free memory."""
    view = _run(_call(listen, "/v1/fleet"))
    if as_json:
        typer.echo(json.dumps(view, indent=2))
        return
    typer.echo(columns(fleet_rows(view)))
    for key, why in view.get("unplaced", {}).items():
        typer.echo(f"unplaced {key}: {why}")


def _mine(view: dict) -> list[str]:
    return next((m["holds"] for m in view["members"] if m["member"] == view["member"]), [])


def drain(listen: ListenOption = DEFAULT_LISTEN,
          timeout: Annotated[float, typer.Option(min=1, help="Give up after this many seconds.")] = 600.0,
          stuck_after: Annotated[float, typer.Option(min=1, help="Give up when no other Mac can take what is left for this long.")] = 15.0) -> None:
    """Move this Mac's replicas to other Macs (each starts there before it stops here) and take no new ones.

    Exits 0 once nothing is served here, 3 if something still is (no other Mac can take it, or
    the timeout passed), 1 if no agent with --fleet answers.
    """
    async def run() -> int:
        view = await _call(listen, "/v1/fleet/drain", "POST")
        typer.echo(f"{view['member']} cordoned: it takes no new replicas")
        began, stuck_since, said = time.monotonic(), None, {}
        while _mine(view):
            for slot, what in view.get("draining", {}).items():
                if said.get(slot) != what:
                    said[slot] = what
                    typer.echo(f"  {slot}: {what}")
            left = view.get("draining", {}).values()
            if left and all(w.startswith("no other Mac") for w in left):
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since >= stuck_after:
                    typer.echo("not drained: no other Mac can take what is left; it is still served here", err=True)
                    return NOT_DRAINED
            else:
                stuck_since = None
            if time.monotonic() - began >= timeout:
                typer.echo(f"not drained after {timeout:.0f}s; left here: {', '.join(_mine(view))}", err=True)
                return NOT_DRAINED
            await asyncio.sleep(1.0)
            view = await _call(listen, "/v1/fleet")
        typer.echo("drained: nothing is served here now (metal-agent uncordon takes replicas again)")
        return 0

    code = _run(run())
    if code:
        raise typer.Exit(code)


def uncordon(listen: ListenOption = DEFAULT_LISTEN) -> None:
    """Let this Mac take replicas again after a drain."""
    view = _run(_call(listen, "/v1/fleet/uncordon", "POST"))
    typer.echo(f"{view['member']} uncordoned: it takes replicas again")
