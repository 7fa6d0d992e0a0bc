"""Issue 23's pure rules: the sleep assertion, the GPU's wired-memory ceiling, the thermal state.

The parsers read transcribed macOS output from tests/fixtures/macos/ (each file
names the public post it was transcribed from); see its README.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metal_agent.core.memory import GiB
from metal_agent.core.sleep_assertion import (
    ASSERTION_TYPE,
    CAFFEINATE_NAME,
    SleepMode,
    caffeinate_argv,
    describe_held,
    parse_assertions,
    want_held,
)
from metal_agent.core.thermal import parse_therm
from metal_agent.core.wired_limit import (
    MiB,
    ceiling,
    check_wired,
    parse_sysctl_int,
    raise_command,
    suggested_limit_mb,
    validate_limit_mb,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "macos"


def recorded(name: str, **fill: str) -> str:
    text = "".join(line for line in (FIXTURES / name).read_text().splitlines(keepends=True)
                   if not line.startswith("#"))
    for key, value in fill.items():
        text = text.replace("{" + key + "}", value)
    return text


# --- sleep assertion ---------------------------------------------------------------


@pytest.mark.parametrize("mode, active, held", [
    (SleepMode.AUTO, 0, False), (SleepMode.AUTO, 1, True), (SleepMode.AUTO, 3, True),
    (SleepMode.ALWAYS, 0, True), (SleepMode.NEVER, 5, False),
])
def test_want_held(mode, active, held):
    assert want_held(mode, active) is held


def test_caffeinate_argv_is_pinned_and_absolute():
    assert caffeinate_argv(4242) == ("/usr/bin/caffeinate", "-i", "-w", "4242")
    with pytest.raises(ValueError):
        caffeinate_argv(0)


def test_assertions_with_caffeinate_parse():
    counts, owned = parse_assertions(recorded("pmset-assertions-caffeinate.txt", pid="366"))
    assert counts[ASSERTION_TYPE] == 1 and counts["PreventSystemSleep"] == 0
    assert [(a.pid, a.process, a.type, a.name) for a in owned] == [
        (366, "caffeinate", ASSERTION_TYPE, CAFFEINATE_NAME)]


def test_assertions_without_caffeinate_parse():
    counts, owned = parse_assertions(recorded("pmset-assertions-no-caffeinate.txt"))
    assert counts["InternalPreventDisplaySleep"] == 1
    assert [(a.pid, a.process, a.type) for a in owned] == [
        (483, "sharingd", ASSERTION_TYPE), (157, "powerd", "InternalPreventDisplaySleep")]


def test_describe_held_names_whether_ours_is_listed():
    text = recorded("pmset-assertions-caffeinate.txt", pid="366")
    assert "is among them" in describe_held(text, 366)
    assert "NOT among them" in describe_held(text, 367)
    other = describe_held(recorded("pmset-assertions-no-caffeinate.txt"), 366)
    assert "sharingd (pid 483, 'Handoff')" in other and "NOT among them" in other


# --- wired ceiling -----------------------------------------------------------------


def test_sysctl_values_parse():
    assert parse_sysctl_int("0\n") == 0
    assert parse_sysctl_int("34359738368\n") == 34359738368
    for bad in ("", "sysctl: unknown oid 'iogpu.wired_limit_mb'", "-1", "1.5", "１２"):
        assert parse_sysctl_int(bad) is None


def test_default_ceiling_follows_ram():
    small = ceiling(0, 32 * GiB)  # the llmfit#570 reporter's M1 Max before they set it
    assert small.bytes == int(32 * GiB * 2 / 3) and "iogpu.wired_limit_mb=0" in small.source
    large = ceiling(0, 128 * GiB)
    assert large.bytes == 96 * GiB


def test_configured_ceiling_and_cap_at_ram():
    assert ceiling(26000, 32 * GiB).bytes == 26000 * MiB  # tests/fixtures/macos/sysctl-set-wired_limit_mb.txt
    assert ceiling(10**9, 32 * GiB).bytes == 32 * GiB
    assert ceiling(26000, 32 * GiB).source == "iogpu.wired_limit_mb=26000"


@pytest.mark.parametrize("ram_gib, suggested", [(8, 4096), (16, 12288), (32, 27648), (64, 55296), (128, 110592)])
def test_suggested_value_leaves_room_for_macos(ram_gib, suggested):
    assert suggested_limit_mb(ram_gib * GiB) == suggested
    assert raise_command(suggested) == f"sudo /usr/sbin/sysctl iogpu.wired_limit_mb={suggested}"


def test_check_wired_counts_every_running_service():
    limit = ceiling(0, 32 * GiB)  # 21.33 GiB
    assert check_wired("ns/a", 10 * GiB, {}, limit) is None
    assert check_wired("ns/a", 10 * GiB, {"ns/a": 20 * GiB}, limit) is None  # a respawn replaces itself
    why = check_wired("ns/b", 12 * GiB, {"ns/a": 10 * GiB}, limit)
    assert why is not None
    assert "exceeds the GPU's wired-memory ceiling of 21.33 GiB" in why
    assert "10.00 GiB already wired by other services" in why
    assert "sudo /usr/sbin/sysctl iogpu.wired_limit_mb=27648" in why
    assert "make install-wired-limit WIRED_LIMIT_MB=27648" in why
    assert check_wired("ns/b", 100 * GiB, {}, None) is None  # unknown ceiling: not checked


def test_no_raise_hint_when_already_above_the_suggestion():
    why = check_wired("ns/a", 31 * GiB, {}, ceiling(30000, 32 * GiB))
    assert why is not None and "raise it" not in why


@pytest.mark.parametrize("value", ["", "abc", "12.5", "-4096", "4096; rm -rf /", "1023", "9999999999", " 4096x"])
def test_boot_setter_refuses_anything_but_a_sane_integer(value):
    with pytest.raises(ValueError):
        validate_limit_mb(value)


def test_boot_setter_value_bounded_by_ram():
    assert validate_limit_mb("27648", 32 * GiB) == 27648
    with pytest.raises(ValueError, match="more than this Mac's RAM"):
        validate_limit_mb("40000", 32 * GiB)


# --- thermal -------------------------------------------------------------------------


def test_apple_silicon_reports_nothing_recorded():
    state = parse_therm(recorded("pmset-therm-apple-silicon.txt"))
    assert state is not None and not state.throttled
    assert state.cpu_speed_limit is None and state.describe() == "no thermal throttling reported"


def test_intel_speed_limit_is_throttling():
    state = parse_therm(recorded("pmset-therm-intel-throttled.txt"))
    assert state is not None and state.throttled and state.cpu_speed_limit == 35
    assert "CPU speed limited to 35%" in state.describe() and "tokens come slower" in state.describe()


def test_warning_levels_are_throttling():
    state = parse_therm("Thermal warning level set to 2.\nPerformance warning level set to 10.\n")
    assert state is not None and state.throttled
    assert state.thermal_warning == 2 and state.performance_warning == 10


def test_other_output_is_not_a_reading():
    assert parse_therm("pmset: unknown option\n") is None


# --- metal-agent status ----------------------------------------------------------------


def test_status_lines_for_the_mac():
    from metal_agent.cli.status import format_mac

    held = format_mac({"sleep_assertion": {"mode": "auto", "held": True, "pid": 812, "problem": None},
                       "wired_limit": {"bytes": 26000 * MiB, "source": "iogpu.wired_limit_mb=26000"},
                       "thermal": {"throttled": False, "state": "no thermal throttling reported"}})
    assert held.splitlines() == [
        "sleep assertion: held (caffeinate pid 812, --prevent-sleep=auto)",
        "GPU wired-memory ceiling: 25.4 GiB (iogpu.wired_limit_mb=26000)",
        "thermal: no thermal throttling reported",
    ]
    unknown = format_mac({"sleep_assertion": {"mode": "auto", "held": False, "pid": None,
                                              "problem": "cannot run /usr/bin/caffeinate: No such file or directory"},
                          "wired_limit": None, "thermal": None})
    assert unknown.splitlines() == [
        "sleep assertion: not held (--prevent-sleep=auto): cannot run /usr/bin/caffeinate: No such file or directory",
        "GPU wired-memory ceiling: unknown (not read on this host)",
        "thermal: unknown (pmset -g therm not read)",
    ]
