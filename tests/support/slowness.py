"""One factor for every wall-clock upper bound the suite asserts.

A bound such as "the process is gone within a second of the delete" is a
claim about the agent on an idle machine. On a loaded 2-core machine (CI
beside other jobs, a laptop compiling) the same agent takes longer, and a
test that fails there teaches people to ignore red. Tests assert order and
structure where they can; where a duration is the point, they scale it by
`factor()`:

- METAL_AGENT_TEST_SLOWNESS, if set (e.g. 3 on a known-slow runner);
- else the machine's load per CPU, at least 1 (an idle machine: the bound as
  written), at most MAX_AUTO: the larger of the 1-minute load average and the
  processes runnable right now (the average lags a burst by a minute; the
  instant count sees it at once).

Lower bounds ("waited at least the back-off") are never scaled: a loaded
machine only makes them easier to meet.
"""

from __future__ import annotations

import os

ENV = "METAL_AGENT_TEST_SLOWNESS"
MAX_AUTO = 8.0


def factor() -> float:
    """How much slower than an idle machine this one is now (>= 1)."""
    configured = os.environ.get(ENV)
    if configured:
        value = float(configured)
        if value < 1:
            raise ValueError(f"{ENV}={configured}: must be >= 1 (1 is an idle machine)")
        return value
    cpus = os.cpu_count() or 1
    try:
        load = max(os.getloadavg()[0], _runnable_now())
    except OSError:  # no load average on this platform
        return 1.0
    return min(MAX_AUTO, max(1.0, load / cpus))


def _runnable_now() -> float:
    """Processes running or ready to run at this instant (Linux), 0 where unknown. The
    caller itself is one of them, so it is not counted."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, running - 1.0)


def scaled(seconds: float) -> float:
    """An upper bound of `seconds` on an idle machine, stretched for this one."""
    return seconds * factor()
