"""No idle sleep while serving: when to hold the assertion, how, and how to read macOS's list of them.

An idle Mac goes to sleep and takes every model off the cluster. While at
least one service is serving or loading, the agent keeps a supervised
`/usr/bin/caffeinate -i -w <agent pid>` child: `-i` asserts
PreventUserIdleSystemSleep, `-w` makes caffeinate end (and the assertion
with it) when the agent's process ends, however it ends. The argv is fixed
here, absolute, with no shell and nothing from a spec in it.

What it cannot do: a closed MacBook lid without an external display and
power still sleeps, and sleep the owner asks for (menu, `pmset sleepnow`,
a schedule) still happens: the assertion only stops *idle* sleep.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

CAFFEINATE = "/usr/bin/caffeinate"
PMSET = "/usr/bin/pmset"
ASSERTION_TYPE = "PreventUserIdleSystemSleep"
CAFFEINATE_NAME = "caffeinate command-line tool"  # the name caffeinate gives its assertion


class SleepMode(str, enum.Enum):
    AUTO = "auto"  # held while >= 1 service serves or loads
    ALWAYS = "always"  # held while the agent runs
    NEVER = "never"  # never held


def want_held(mode: SleepMode, active_services: int) -> bool:
    if mode is SleepMode.ALWAYS:
        return True
    if mode is SleepMode.NEVER:
        return False
    return active_services > 0


def caffeinate_argv(agent_pid: int, caffeinate: str = CAFFEINATE) -> tuple[str, ...]:
    if agent_pid <= 0:
        raise ValueError(f"not a pid: {agent_pid}")
    return (caffeinate, "-i", "-w", str(agent_pid))


@dataclass(frozen=True, slots=True)
class Assertion:
    """One line of `pmset -g assertions`' "Listed by owning process"."""

    pid: int
    process: str
    type: str
    name: str


# "   pid 366(caffeinate): [0x00000025000180ba] 03:16:41 PreventUserIdleSystemSleep named: "caffeinate command-line tool""
_OWNED = re.compile(r'^\s*pid (\d+)\(([^)]*)\):\s*(?:\[[0-9a-fA-Fx]+\]\s*)?(?:[\d:]+\s+)?(\w+) named: "(.*)"\s*$')
_SYSTEM_WIDE = re.compile(r"^\s*(\w+)\s+(\d+)\s*$")


def parse_assertions(text: str) -> tuple[dict[str, int], list[Assertion]]:
    """`pmset -g assertions` as (system-wide counts by type, assertions by owning process)."""
    counts: dict[str, int] = {}
    owned: list[Assertion] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("Assertion status system-wide"):
            section = "system"
        elif line.startswith("Listed by owning process"):
            section = "owned"
        elif line and not line[0].isspace():
            section = ""
        elif section == "system" and (m := _SYSTEM_WIDE.match(line)):
            counts[m.group(1)] = int(m.group(2))
        elif section == "owned" and (m := _OWNED.match(line)):
            owned.append(Assertion(int(m.group(1)), m.group(2), m.group(3), m.group(4)))
    return counts, owned


def describe_held(text: str, pid: int | None) -> str:
    """What `pmset -g assertions` says about idle sleep, and whether `pid`'s caffeinate is among the holders."""
    counts, owned = parse_assertions(text)
    holders = [a for a in owned if a.type == ASSERTION_TYPE]
    ours = [a for a in holders if pid is not None and a.pid == pid]
    who = ", ".join(f"{a.process} (pid {a.pid}, {a.name!r})" for a in holders) or "nobody"
    state = "prevented" if counts.get(ASSERTION_TYPE) else "allowed"
    mine = f"; the agent's caffeinate (pid {pid}) is {'among them' if ours else 'NOT among them'}" \
        if pid is not None else ""
    return f"idle system sleep {state}; {ASSERTION_TYPE} held by {who}{mine}"
