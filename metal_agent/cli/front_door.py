"""`metal-agent front-door`: the data plane process the agent spawns and adopts (issue 21).

Not for people to run by hand: the agent starts it with its own state dir and
steers it over `--socket`. Heavy imports (aiohttp, prometheus_client) happen
when the command runs, so `metal-agent --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def front_door(
    socket: Annotated[Path, typer.Option("--socket", help="Control socket (created 0600).")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where the last table is kept.")],
    agent_socket: Annotated[Optional[Path], typer.Option(
        "--agent-socket", help="The agent's socket for token reviews and wakes [default: <state-dir>/agent.sock].")] = None,
    grace: Annotated[float, typer.Option("--grace", help="Seconds to finish requests in flight on SIGTERM.")] = 30.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
    log_format: Annotated[str, typer.Option("--log-format")] = "auto",
) -> None:
    """Run the front door (the agent spawns this; see `run --front-door`)."""
    import asyncio

    from metal_agent.frontdoor.access import Access, AgentReviewer
    from metal_agent.frontdoor.server import FrontDoor
    from metal_agent.frontdoor.wake import AgentWaker
    from metal_agent.logging_setup import configure_logging

    configure_logging(log_level, log_format)

    async def main() -> None:
        reviewer = AgentReviewer(agent_socket or state_dir / "agent.sock")
        waker = AgentWaker(agent_socket or state_dir / "agent.sock")
        door = FrontDoor(state_dir, socket, Access(reviewer), grace_s=grace, wake=waker.wake)
        try:
            await door.run()
        finally:
            await reviewer.close()
            await waker.close()

    asyncio.run(main())
