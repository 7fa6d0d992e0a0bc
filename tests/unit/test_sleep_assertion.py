"""The sleep assertion's holder with a real child: the caffeinate stand-in (tests/support/mac_stand_ins.py).

caffeinate exists only on macOS; the stand-in refuses any argv but `-i -w <pid>`
and ends when that pid ends, which is what the holder relies on.
"""

from __future__ import annotations

import contextlib
import json
import os

import psutil
from prometheus_client import CollectorRegistry

from metal_agent.adapters.sleep_assertion import RECORD_NAME, SleepAssertion
from metal_agent.core.sleep_assertion import SleepMode
from tests.support import mac_stand_ins
from tests.support.procs import process_gone
from tests.support.wait import wait_for


def holder(tmp_path, active: list[int], mode: SleepMode = SleepMode.AUTO, caffeinate=None):
    registry = CollectorRegistry()
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    hold = SleepAssertion(registry, mode=mode, state_dir=state, active=lambda: active[0],
                          caffeinate=str(caffeinate or mac_stand_ins.caffeinate(tmp_path)))
    return hold, registry


async def test_held_with_one_service_released_with_none(tmp_path):
    active = [0]
    hold, registry = holder(tmp_path, active)
    await hold.apply()
    assert not hold.held and registry.get_sample_value("llmkube_metal_agent_sleep_assertion_held") == 0
    active[0] = 1
    await hold.apply()
    await hold.apply()  # still one
    assert hold.held and registry.get_sample_value("llmkube_metal_agent_sleep_assertion_held") == 1
    child = psutil.Process(hold.pid)
    assert child.cmdline()[-3:] == ["-i", "-w", str(os.getpid())]
    assert [p.pid for p in mac_stand_ins.running_caffeinates(tmp_path / "caffeinate")] == [child.pid]
    record = json.loads((tmp_path / "state" / RECORD_NAME).read_text())
    assert record["pid"] == child.pid and record["cmdline"] == child.cmdline()
    active[0] = 0
    await hold.apply()
    assert not hold.held and process_gone(child.pid) and not (tmp_path / "state" / RECORD_NAME).exists()


async def test_a_child_that_dies_is_taken_again(tmp_path):
    hold, _ = holder(tmp_path, [1], SleepMode.ALWAYS)
    await hold.apply()
    first = hold.pid
    psutil.Process(first).kill()
    await wait_for(lambda: hold._proc.returncode is not None, timeout=10, what="the child reaped")
    await hold.apply()
    assert hold.held and hold.pid != first
    await hold.release()


async def test_a_missing_caffeinate_is_a_problem_not_a_crash(tmp_path):
    hold, _ = holder(tmp_path, [1], caffeinate=tmp_path / "no-such-caffeinate")
    await hold.apply()
    assert not hold.held and "cannot run" in (hold.problem or "")
    assert hold.view() == {"mode": "auto", "held": False, "pid": None, "problem": hold.problem}


async def test_a_stale_record_is_ended_only_when_it_is_provably_that_process(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CAFFEINATE_IGNORE_W", "1")
    old, _ = holder(tmp_path, [1])
    await old.apply()
    left = psutil.Process(old.pid)
    try:
        old._proc = None  # as if its agent had died without a shutdown
        record = tmp_path / "state" / RECORD_NAME

        # A record naming a live process that is not that caffeinate (another start time): not touched.
        forged = json.loads(record.read_text())
        record.write_text(json.dumps({**forged, "create_time": forged["create_time"] - 100}))
        new, _ = holder(tmp_path, [1])
        await new.end_stale()
        assert left.is_running() and not record.exists()

        record.write_text(json.dumps(forged))
        await new.end_stale()
        await wait_for(lambda: process_gone(left.pid), timeout=10, what="the left caffeinate ended")
        await new.apply()
        assert new.held
        assert [p.pid for p in mac_stand_ins.running_caffeinates(tmp_path / "caffeinate")] == [new.pid]
        await new.release()
    finally:  # the stand-in ignores -w: never leave it behind when an assertion fails
        with contextlib.suppress(psutil.Error):
            left.kill()
