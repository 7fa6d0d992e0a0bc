"""Ask a running agent for its services over HTTP (`GET /v1/services` on its `--listen` address).

Used by `metal-agent status` and by the doctor. Kept out of `cli.status`
because it imports aiohttp, which no other command needs: the status module
is imported by every invocation, this one only when it talks to an agent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from metal_agent.cli.status import AgentUnreachable, services_url

__all__ = ["fetch_services"]


async def fetch_services(listen: str, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's `/v1/services` payload, or AgentUnreachable."""
    url = services_url(listen)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url) as response:
                if response.status != 200:
                    raise AgentUnreachable(f"{url} answered HTTP {response.status}: not a metal-agent?")
                payload = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise AgentUnreachable(f"no agent answers at {url} ({type(exc).__name__}: {exc or 'timed out'})") from None
    except ValueError:
        raise AgentUnreachable(f"{url} did not answer JSON: not a metal-agent?") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("services"), list):
        raise AgentUnreachable(f"{url} answered without a services list: not a metal-agent?")
    return payload
