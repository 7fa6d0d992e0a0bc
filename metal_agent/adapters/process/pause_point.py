"""A breakpoint a test can set in the running daemon, at a moment no outside poll can catch.

Between a llama-server's exec and the record that names its pid lies a window
of about a millisecond. An agent killed there leaves a process whose record
has no pid yet, which the next agent must find by its command line and adopt
or stop: the adoption case that matters most, and one a test polling from
outside hits only sometimes. With `METAL_AGENT_PAUSE_AT=<point>` in its
environment the agent stops itself (SIGSTOP) at that point, so a test can
kill it exactly there, every time.

Unset, as everywhere outside tests, a pause point is one environment lookup.
Stopping itself is all it can do: whoever sets a daemon's environment could
stop it anyway.
"""

from __future__ import annotations

import os
import signal

ENV = "METAL_AGENT_PAUSE_AT"
AFTER_EXEC = "after-exec"  # a llama-server is running; its record does not name its pid yet
AFTER_FRONT_DOOR_EXEC = "after-front-door-exec"  # the front door runs; its record does not name its pid yet
# An older agent's engines are routed through the front door where they listen, none moved yet
# (controller/rebind.py): a test sends its load from here, then lets the agent go on.
BEFORE_FIRST_MOVE = "before-first-move"


def pause_point(point: str) -> None:
    """Stop this process here (until SIGCONT, or a SIGKILL) if the environment asks to."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGSTOP)
