"""Read the Mac's thermal state (`pmset -g therm`) and GPU wired-memory ceiling (`sysctl`), and keep them current.

Both are unprivileged, fixed commands (no shell, a timeout, `LC_ALL=C`), read
every `interval` seconds: the owner may raise the ceiling with `sudo sysctl`
while the agent runs, and heat comes and goes. Where a command is missing or
says something else (Linux, an older macOS) the reading is None and nothing
is checked or exported for it: the agent never guesses a ceiling it could
not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import structlog
from prometheus_client import CollectorRegistry, Gauge

from metal_agent.core.names import METRIC_PREFIX as P
from metal_agent.core.thermal import PMSET_THERM, ThermalState, parse_therm
from metal_agent.core.wired_limit import SYSCTL, WIRED_LIMIT_KEY, WiredCeiling, ceiling, parse_sysctl_int
from metal_agent.tasks import within

log = structlog.get_logger(__name__)

COMMAND_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 30.0
UNREADABLE_INTERVAL_S = 600.0  # where nothing could be read: not a Mac


async def _output(argv: Sequence[str]) -> str | None:
    """stdout of a fixed command, or None when it cannot run, fails or hangs."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"})
    except OSError:
        return None
    try:
        out, _ = await within(proc.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None
    return out.decode(errors="replace") if proc.returncode == 0 else None


async def read_wired_ceiling(sysctl: str = SYSCTL) -> WiredCeiling | None:
    """The GPU's wired-memory ceiling, or None where `iogpu.wired_limit_mb` or `hw.memsize` cannot be read."""
    limit, ram = await asyncio.gather(_output((sysctl, "-n", WIRED_LIMIT_KEY)), _output((sysctl, "-n", "hw.memsize")))
    limit_mb = parse_sysctl_int(limit) if limit is not None else None
    ram_bytes = parse_sysctl_int(ram) if ram is not None else None
    if limit_mb is None or not ram_bytes:
        return None
    return ceiling(limit_mb, ram_bytes)


async def read_thermal(pmset: Sequence[str] = PMSET_THERM) -> ThermalState | None:
    out = await _output(pmset)
    return parse_therm(out) if out is not None else None


@dataclass(frozen=True)
class ReadingCommands:
    sysctl: str = SYSCTL
    pmset_therm: tuple[str, ...] = PMSET_THERM
    interval: float = DEFAULT_INTERVAL_S


class MacReadings:
    """The latest ceiling and thermal state, with their gauges; `note()` for /readyz."""

    def __init__(self, registry: CollectorRegistry, commands: ReadingCommands = ReadingCommands(),
                 on_ceiling_change: Callable[[], object] = lambda: None) -> None:
        self.commands = commands
        self.on_ceiling_change = on_ceiling_change
        self.wired: WiredCeiling | None = None
        self.thermal: ThermalState | None = None
        self.read = asyncio.Event()  # set after the first reading: admission waits for the ceiling
        Gauge(P + "gpu_wired_limit_bytes", "the GPU's wired-memory ceiling admission counts against "
              "(iogpu.wired_limit_mb, or macOS's default share of RAM when it is 0); 0: unknown",
              registry=registry).set_function(lambda: self.wired.bytes if self.wired else 0)
        Gauge(P + "apple_thermal_throttled", "1 while macOS reports thermal or performance throttling "
              "(pmset -g therm); 0 otherwise or unknown", registry=registry,
              ).set_function(lambda: 1 if self.thermal and self.thermal.throttled else 0)
        Gauge(P + "apple_thermal_warning_level", "macOS's thermal warning level (pmset -g therm; 0: none recorded)",
              registry=registry).set_function(lambda: self.thermal.thermal_warning if self.thermal else 0)
        Gauge(P + "apple_cpu_speed_limit_percent", "CPU_Speed_Limit from pmset -g therm (Intel Macs; 100 "
              "where not reported)", registry=registry).set_function(
            lambda: self.thermal.cpu_speed_limit if self.thermal and self.thermal.cpu_speed_limit is not None else 100)

    def current_ceiling(self) -> WiredCeiling | None:
        return self.wired

    async def refresh(self) -> None:
        wired, thermal = await asyncio.gather(read_wired_ceiling(self.commands.sysctl),
                                              read_thermal(self.commands.pmset_therm))
        if wired != self.wired:
            log.info("GPU wired-memory ceiling", bytes=wired.bytes if wired else None,
                     source=wired.source if wired else "unreadable (not a Mac?)")
        if thermal is not None and (self.thermal is None or thermal.throttled != self.thermal.throttled):
            (log.warning if thermal.throttled else log.info)("thermal state", state=thermal.describe())
        changed = self.read.is_set() and wired != self.wired
        self.wired, self.thermal = wired, thermal
        self.read.set()
        if changed:
            self.on_ceiling_change()

    def note(self) -> str | None:
        """What /readyz adds to "ready" while macOS throttles."""
        return self.thermal.describe() if self.thermal is not None and self.thermal.throttled else None

    def view(self) -> dict:
        w, t = self.wired, self.thermal
        return {"wired_limit": {"bytes": w.bytes, "source": w.source} if w else None,
                "thermal": {"throttled": t.throttled, "state": t.describe()} if t else None}

    async def run(self) -> None:
        while True:
            await self.refresh()
            # Where neither reading works (not a Mac, or one without either), the commands are
            # only tried again now and then: each try is a fork and exec, and on an idle agent
            # three of them every 30 s were most of its CPU.
            nothing = self.wired is None and self.thermal is None
            await asyncio.sleep(max(self.commands.interval, UNREADABLE_INTERVAL_S) if nothing
                                else self.commands.interval)
