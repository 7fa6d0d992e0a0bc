"""`--host-ip` validation: what may be published in an EndpointSlice, and what may only be listened on.

A registered address goes into an EndpointSlice the cluster routes to, so
it must be routable unicast. Without registration (`--no-register`) it is
only llama-server's listen address on this Mac: any IP literal is allowed.
The second half pins an operator-precedence bug that refused unspecified,
link-local and multicast literals even without registration.
"""

from __future__ import annotations

import pytest

from metal_agent.core.host_address import validate_host_ip

NOT_ROUTABLE = ["127.0.0.1", "::1", "0.0.0.0", "::", "169.254.1.1", "fe80::1", "224.0.0.251", "ff02::1"]


@pytest.mark.parametrize("value", NOT_ROUTABLE)
def test_registered_address_must_be_routable_unicast(value):
    with pytest.raises(ValueError, match="cannot be registered in an EndpointSlice"):
        validate_host_ip(value, registered=True)


@pytest.mark.parametrize("value", NOT_ROUTABLE)
def test_unregistered_address_may_be_any_literal(value):
    assert validate_host_ip(value, registered=False) == value


@pytest.mark.parametrize("value", ["100.101.102.103", "192.168.1.20", "fd7a:115c:a1e0::1", "2001:db8::7"])
@pytest.mark.parametrize("registered", [True, False])
def test_routable_address_is_accepted_and_normalised(value, registered):
    assert validate_host_ip(value, registered=registered) == value
    assert validate_host_ip(value.upper(), registered=registered) == value  # IPv6 in its canonical form


@pytest.mark.parametrize("value", ["mac.local", "300.1.1.1", "", "10.0.0.1/24"])
@pytest.mark.parametrize("registered", [True, False])
def test_not_an_ip_literal_is_refused_either_way(value, registered):
    with pytest.raises(ValueError, match="is not an IPv4 or IPv6 address"):
        validate_host_ip(value, registered=registered)


# --- which address is Tailscale's, and when a new reading is a change -------------------------
# Interface data from real macOS output (tests/fixtures/host-address/, each file names its source).

import asyncio  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from metal_agent.adapters.host_address import AddressWatcher, tailscale_ipv4  # noqa: E402
from metal_agent.core.host_address import (  # noqa: E402
    AddressChange,
    AddressTracker,
    Choice,
    NoUsableAddress,
    choose_host_ip,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "host-address"


def _recorded(name: str) -> list[str]:
    return [line for line in (FIXTURES / name).read_text().splitlines() if not line.startswith("#")]


def ifconfig_pairs(name: str) -> list[tuple[str, str]]:
    """(interface, address) as psutil.net_if_addrs() gives them, from macOS `ifconfig` text."""
    pairs, iface = [], None
    for line in _recorded(name):
        if header := re.match(r"^(\S+): flags=", line):
            iface = header.group(1)
        elif address := re.match(r"^\s+inet6? (\S+)", line):
            pairs.append((iface, address.group(1)))
    return pairs


def netstat_own_addresses(name: str) -> list[tuple[str, str]]:
    """The host's own addresses in macOS `netstat -nr`: host routes (UH) to themselves."""
    pairs = []
    for line in _recorded(name):
        fields = line.split()
        if len(fields) >= 4 and fields[0] == fields[1] and fields[2] == "UH" and fields[0][0].isdigit():
            pairs.append((fields[3], fields[0]))
    return pairs


def test_utun_without_a_tailscale_address_is_not_tailscale():
    """A Mac whose only utun carries IPv6 (xjasonlyu/tun2socks#44): en0 is the answer."""
    pairs = ifconfig_pairs("tun2socks-44-ifconfig.txt")
    assert ("utun0", "202:ba74:d101:6ade:d27a:56ff:5e1a:aedc") in pairs and ("en0", "192.168.3.93") in pairs
    choice = choose_host_ip(pairs, "192.168.3.93")
    assert choice == Choice("192.168.3.93", "address of en0, which carries the default route")


def test_tailscale_on_utun_wins_over_the_default_route():
    """tailscale/tailscale#10318: Wi-Fi 172.20.10.5 on en0, Tailscale 100.67.190.17 on utun8."""
    pairs = netstat_own_addresses("tailscale-10318-netstat.txt") + [("en0", "172.20.10.5")]
    assert ("utun8", "100.67.190.17") in pairs
    choice = choose_host_ip(pairs, "172.20.10.5")
    assert choice == Choice("100.67.190.17", "Tailscale address on utun8")


def test_cgnat_address_on_the_lan_interface_is_not_tailscale():
    """100.64/10 on en0 (an ISP's CGNAT, an LTE router) is an ordinary address."""
    pairs = [("lo0", "127.0.0.1"), ("en0", "100.72.14.9"), ("en1", "192.168.7.4")]
    choice = choose_host_ip(pairs, "192.168.7.4")
    assert choice == Choice("192.168.7.4", "address of en1, which carries the default route")
    assert choose_host_ip(pairs, "100.72.14.9").reason == "address of en0, which carries the default route"


def test_tailscale_cli_is_the_authority_when_it_answers():
    """Another VPN's utun may carry 100.64/10 too (e.g. 100.96/12); `tailscale ip -4` settles it."""
    pairs = [("en0", "192.168.1.20"), ("utun3", "100.96.0.7"), ("utun8", "100.67.190.17")]
    assert choose_host_ip(pairs, "192.168.1.20", ("100.67.190.17",)) == \
        Choice("100.67.190.17", "Tailscale address on utun8 (tailscale ip -4)")
    # Tailscale answered "none of these" (e.g. userspace networking): no interface guess either.
    assert choose_host_ip(pairs, "192.168.1.20", ("100.101.1.1",)).address == "192.168.1.20"
    # No answer at all: the interface rule (the first utun with 100.64/10).
    assert choose_host_ip(pairs, "192.168.1.20", None).address == "100.96.0.7"


def test_tailscale_cli_output(tmp_path: Path):
    cli = tmp_path / "tailscale"
    cli.write_text('#!/bin/sh\n[ "$1 $2" = "ip -4" ] || exit 9\necho 100.67.190.17\n')
    cli.chmod(0o755)
    assert tailscale_ipv4(str(cli)) == ("100.67.190.17",)
    cli.write_text("#!/bin/sh\necho 'Tailscale is stopped.' >&2\nexit 1\n")
    assert tailscale_ipv4(str(cli)) is None
    assert tailscale_ipv4(str(tmp_path / "missing")) is None


HOME_WIFI = Choice("192.168.1.20", "address of en0, which carries the default route")
TAILSCALE = Choice("100.67.190.17", "Tailscale address on utun8")
OTHER_WIFI = Choice("10.0.0.31", "address of en0, which carries the default route")


def test_tracker_needs_the_same_new_address_twice():
    tracker = AddressTracker(HOME_WIFI)
    assert tracker.observe(TAILSCALE) is None
    assert tracker.observe(TAILSCALE) == AddressChange(HOME_WIFI, TAILSCALE)
    assert tracker.current == TAILSCALE
    assert tracker.observe(TAILSCALE) is None  # settled: nothing more to do


def test_tracker_ignores_transients_and_outages():
    tracker = AddressTracker(HOME_WIFI)
    for reading in (OTHER_WIFI, None, OTHER_WIFI, HOME_WIFI, OTHER_WIFI, TAILSCALE, OTHER_WIFI):
        assert tracker.observe(reading) is None, reading  # never twice in a row
    assert tracker.current == HOME_WIFI
    assert tracker.observe(None) is None and tracker.observe(None) is None  # Wi-Fi down: keep the old one
    assert tracker.current == HOME_WIFI


def test_tracker_same_address_new_reason_is_no_change():
    tracker = AddressTracker(HOME_WIFI, confirmations=1)
    assert tracker.observe(Choice(HOME_WIFI.address, "first routable address, on en0")) is None
    assert tracker.observe(OTHER_WIFI) == AddressChange(HOME_WIFI, OTHER_WIFI)


def test_tracker_rejects_zero_confirmations():
    with pytest.raises(ValueError):
        AddressTracker(HOME_WIFI, confirmations=0)


class Readings:
    """A detect() that returns (or raises) the next scripted reading, as a worker thread would."""

    def __init__(self, *readings) -> None:
        self.readings = list(readings)

    def __call__(self) -> Choice:
        reading = self.readings.pop(0)
        if isinstance(reading, BaseException):
            raise reading
        return reading


async def test_watcher_reports_one_confirmed_change():
    changes: list[AddressChange] = []
    watcher = AddressWatcher(HOME_WIFI, changes.append,
                             detect=Readings(NoUsableAddress("wifi down"), OSError("netlink"), TAILSCALE, TAILSCALE))
    assert [await watcher.check() for _ in range(4)] == [None, None, None, AddressChange(HOME_WIFI, TAILSCALE)]
    assert changes == [AddressChange(HOME_WIFI, TAILSCALE)] and watcher.current == TAILSCALE


async def test_watcher_survives_a_failing_callback():
    def broken(change: AddressChange) -> None:
        raise RuntimeError("bug in the reconciler's hook")

    watcher = AddressWatcher(HOME_WIFI, broken, confirmations=1, detect=Readings(TAILSCALE, OTHER_WIFI))
    assert await watcher.check() == AddressChange(HOME_WIFI, TAILSCALE)
    assert await watcher.check() == AddressChange(TAILSCALE, OTHER_WIFI)


async def test_watcher_timer_runs_until_stopped():
    """The timer loop reaches the callback on its own; the test waits on the callback, not on time."""
    seen = asyncio.Event()
    changes: list[AddressChange] = []

    def on_change(change: AddressChange) -> None:
        changes.append(change)
        seen.set()

    watcher = AddressWatcher(HOME_WIFI, on_change, interval=0.01, detect=lambda: TAILSCALE)
    task = watcher.start()
    assert watcher.start() is task  # idempotent
    await asyncio.wait_for(seen.wait(), 10)
    await watcher.stop()
    assert task.cancelled() and changes == [AddressChange(HOME_WIFI, TAILSCALE)]


def test_watcher_rejects_a_zero_interval():
    with pytest.raises(ValueError):
        AddressWatcher(HOME_WIFI, lambda change: None, interval=0)
