"""The test-only pause point: a no-op unless the environment names it, a self-SIGSTOP if it does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from metal_agent.adapters.process import pause_point
from tests.support.procs import stopped
from tests.support.wait import wait_for

CALL = "from metal_agent.adapters.process.pause_point import pause_point; pause_point('after-exec'); print('passed')"


def test_unset_it_does_nothing(monkeypatch):
    monkeypatch.delenv(pause_point.ENV, raising=False)
    pause_point.pause_point(pause_point.AFTER_EXEC)  # returns: this process was not stopped


def test_another_point_does_nothing(monkeypatch):
    monkeypatch.setenv(pause_point.ENV, "somewhere-else")
    pause_point.pause_point(pause_point.AFTER_EXEC)


async def test_the_named_point_stops_the_process_until_continued():
    env = dict(os.environ, **{pause_point.ENV: pause_point.AFTER_EXEC})
    child = subprocess.Popen([sys.executable, "-c", CALL], env=env, stdout=subprocess.PIPE, text=True)
    try:
        await wait_for(lambda: stopped(child.pid), timeout=30, what="the child to stop itself")
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=30)
        assert out.strip() == "passed" and child.returncode == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
