"""This machine's addresses (psutil), the default route's source address and Tailscale's
own word on its address; and `AddressWatcher`, which reads them again on a timer.

The decisions (which address, when a new reading is a change) are pure and
live in `metal_agent.core.host_address`; this module only collects facts and
keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
from typing import Callable

import psutil
import structlog

from metal_agent.core.host_address import AddressChange, AddressTracker, Choice, NoUsableAddress, choose_host_ip

log = structlog.get_logger(__name__)

# A TEST-NET-1 address: connecting a UDP socket only asks the kernel for the
# route and source address; no packet is sent.
_ROUTE_PROBE = ("192.0.2.1", 9)

# Where the `tailscale` CLI lives when it is not on PATH: the macOS app
# (standalone and App Store builds) carries it inside its bundle. launchd's
# PATH (see metal_agent.core.launchd) holds Homebrew's prefixes for `brew install tailscale`.
TAILSCALE_APP_CLI = "/Applications/Tailscale.app/Contents/MacOS/Tailscale"
TAILSCALE_TIMEOUT_S = 5.0
_AUTO = "auto"


def _primary_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(_ROUTE_PROBE)
            return sock.getsockname()[0]
        except OSError:
            return None


def interface_addresses() -> list[tuple[str, str]]:
    """(interface, address) for every IPv4 and IPv6 address of this machine (network namespace)."""
    return [
        (iface, addr.address)
        for iface, addrs in psutil.net_if_addrs().items()
        for addr in addrs
        if addr.family in (socket.AF_INET, socket.AF_INET6)
    ]


def find_tailscale_cli() -> str | None:
    found = shutil.which("tailscale")
    if found:
        return found
    return TAILSCALE_APP_CLI if os.access(TAILSCALE_APP_CLI, os.X_OK) else None


def tailscale_ipv4(cli: str, timeout: float = TAILSCALE_TIMEOUT_S) -> tuple[str, ...] | None:
    """The IPv4 addresses `tailscale ip -4` prints (one per line), or None when it gives no answer.

    No answer (logged out, tailscaled stopped, a hung CLI) means "unknown",
    not "no Tailscale": the interface rule in `choose_host_ip` decides then.
    """
    try:
        done = subprocess.run([cli, "ip", "-4"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.debug("tailscale ip -4 gave no answer", cli=cli, error=str(err))
        return None
    if done.returncode != 0:
        return None
    found = []
    for line in done.stdout.split():
        with contextlib.suppress(ValueError):
            found.append(str(ipaddress.IPv4Address(line.strip())))
    return tuple(found)


def detect_host_ip(tailscale_cli: str | None = _AUTO) -> Choice:
    """Blocking (psutil, a UDP connect, maybe `tailscale ip -4`): call from a thread in async code.

    `tailscale_cli` is the CLI to ask, None to ask nobody, or "auto" to look
    for it on PATH and in the macOS app.
    """
    cli = find_tailscale_cli() if tailscale_cli == _AUTO else tailscale_cli
    tailscale_ips = tailscale_ipv4(cli) if cli else None
    return choose_host_ip(interface_addresses(), _primary_address(), tailscale_ips)


class AddressWatcher:
    """Re-detects the host address every `interval` seconds and calls `on_change` when it has moved.

    Start it with the address the agent started with (not for a `--host-ip`
    given by hand: that one never changes). `on_change(AddressChange)` runs
    on the event loop, once per confirmed change (see `AddressTracker`: the
    same new address read `confirmations` times in a row; no address at all
    keeps the old one); it must not block: set an Event or queue work. An
    exception in it is logged and the watcher goes on.

    Detection runs in a worker thread (`detect`, default `detect_host_ip`),
    so a slow `tailscale` CLI never stalls the loop; a detection that fails
    is logged and counts as "no reading".
    """

    def __init__(
        self,
        current: Choice,
        on_change: Callable[[AddressChange], None],
        *,
        interval: float = 15.0,
        confirmations: int = 2,
        detect: Callable[[], Choice] = detect_host_ip,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.on_change = on_change
        self.detect = detect
        self._tracker = AddressTracker(current, confirmations)
        self._task: asyncio.Task | None = None

    @property
    def current(self) -> Choice:
        """The address in force: the start-up one, or the last confirmed change."""
        return self._tracker.current

    async def check(self) -> AddressChange | None:
        """Read the address once now; returns (and reports) a confirmed change."""
        try:
            detected: Choice | None = await asyncio.to_thread(self.detect)
        except NoUsableAddress:
            detected = None
        except Exception:  # noqa: BLE001 - psutil or a socket error: no reading this time
            log.exception("host address detection failed; keeping the current address",
                          address=self.current.address)
            detected = None
        change = self._tracker.observe(detected)
        if change is not None:
            log.warning("host address changed", old=change.old.address, new=change.new.address,
                        reason=change.new.reason)
            try:
                self.on_change(change)
            except Exception:  # noqa: BLE001 - a callback bug must not stop the watching
                log.exception("host address change callback failed")
        return change

    async def run(self) -> None:
        """Check every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    def start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="host address watcher")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
