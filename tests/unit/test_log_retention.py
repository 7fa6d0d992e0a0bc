"""The log directory stays bounded: the agent's own log (written by launchd) and old service logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from metal_agent.adapters.process.log_retention import remove_stale_service_logs, rotate_agent_log


def test_agent_log_is_rotated_only_when_it_is_our_stderr(tmp_path):
    log = tmp_path / "agent.log"
    log.write_bytes(b"x" * 2000)
    assert not rotate_agent_log(tmp_path, max_bytes=1000)  # this test's stderr is not that file
    assert log.stat().st_size == 2000

    # As under launchd: stderr is agent.log opened for appending; the process writes after rotation.
    script = ("import sys; from pathlib import Path; from metal_agent.adapters.process.log_retention import rotate_agent_log;"
              f"print(rotate_agent_log(Path({str(tmp_path)!r}), max_bytes=1000), file=sys.stderr, flush=True);"
              "print('after', file=sys.stderr, flush=True)")
    with open(log, "ab") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True)
    assert (tmp_path / "agent.log.1").read_bytes().startswith(b"x" * 2000)
    assert log.read_text().splitlines()[-1] == "after"
    assert log.stat().st_size < 100  # truncated, and appending went on at the new end (no hole)


def test_logs_of_services_long_gone_are_removed(tmp_path):
    now = time.time()
    for name in ("ns__old.log", "ns__old.log.1", "ns__live.log", "ns__recent.log", "agent.log"):
        (tmp_path / name).write_text("x")
    for name in ("ns__old.log", "ns__old.log.1", "ns__live.log", "agent.log"):
        os.utime(tmp_path / name, (now - 10 * 86400, now - 10 * 86400))
    removed = remove_stale_service_logs(tmp_path, {"ns__live.log"}, retention=7 * 86400, now=now)
    assert sorted(removed) == ["ns__old.log", "ns__old.log.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.log", "ns__live.log", "ns__recent.log"]
