"""`metal-agent stop-all`'s work: stop the engines and the front door recorded in the state directory.

Kept apart from the command (`metal_agent.cli.install`) because it imports
the process adapters (psutil, aiohttp, structlog), which `--help` and the
other commands must not pay for.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from metal_agent.adapters.process.front_door_process import RECORD_FILE, resolve_record
from metal_agent.adapters.process.manager import terminate_recorded
from metal_agent.adapters.process.records import ProcessRecord, RecordStore, live_process

__all__ = ["stop_front_door", "stop_recorded"]


async def _stop_one(store: RecordStore, record: ProcessRecord, grace: float) -> tuple[str, bool]:
    """Stop one recorded llama-server; a pid that fails verification is never signalled."""
    if live_process(record) is None:
        store.remove(record.key)
        return f"{record.key}: pid {record.pid} is not running (or is no longer that process); record removed", True
    await terminate_recorded(record, grace)
    if live_process(record) is not None:
        return f"{record.key}: pid {record.pid} did not exit; record kept", False
    store.remove(record.key)
    return f"{record.key}: stopped pid {record.pid}", True


async def stop_recorded(directory: Path, grace: float) -> bool:
    """Stop every llama-server recorded in `directory`, printing one line each; False if any survived."""
    store = RecordStore(directory)
    records = store.load_all()
    if not records:
        typer.echo(f"no llama-server records in {store.dir}")
        return True
    results = await asyncio.gather(*(_stop_one(store, r, grace) for r in records))
    for line, _ in results:
        typer.echo(line)
    return all(ok for _, ok in results)


async def stop_front_door(state_dir: Path, grace: float) -> bool:
    """Stop the front door an agent left serving (`--front-door`), if its record proves it is
    that process; print one line when there was one. False if it survived."""
    path = state_dir / RECORD_FILE
    record = await asyncio.to_thread(resolve_record, path)  # a pre-exec record: found by its command line
    if record is None:
        return True
    if live_process(record) is not None:
        await terminate_recorded(record, grace)
        if live_process(record) is not None:
            typer.echo(f"front door: pid {record.pid} did not exit; record kept")
            return False
        typer.echo(f"front door: stopped pid {record.pid}")
    else:
        typer.echo(f"front door: pid {record.pid} is not running (or is no longer that process); record removed")
    path.unlink(missing_ok=True)
    return True
