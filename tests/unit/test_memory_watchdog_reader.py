"""The readings-file reader behind `--memory-readings-file` (pressure drills and the fault tests)."""

from __future__ import annotations

import json

import pytest

from metal_agent.adapters.memory_watchdog import file_reader
from metal_agent.core.pressure import Level


async def test_reads_the_file_afresh_at_every_check(tmp_path):
    path = tmp_path / "memory.json"
    read = file_reader(path)
    path.write_text(json.dumps({"total_bytes": 100, "available_bytes": 50}))
    first = await read()
    path.write_text(json.dumps({"total_bytes": 100, "available_bytes": 3, "kernel_level": "critical"}))
    second = await read()
    assert (first.available_bytes, first.kernel_level) == (50, None)
    assert (second.available_bytes, second.kernel_level) == (3, Level.CRITICAL)


@pytest.mark.parametrize("content", ["", "{}", '{"total_bytes": 1, "available_bytes": 1, "kernel_level": "dire"}'])
async def test_a_bad_file_fails_the_reading(tmp_path, content):
    """The watchdog logs and skips a failed reading; it never acts on a made-up one."""
    path = tmp_path / "memory.json"
    path.write_text(content)
    with pytest.raises((ValueError, KeyError)):
        await file_reader(path)()
