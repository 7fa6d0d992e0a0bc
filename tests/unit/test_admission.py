"""Admission decisions: which budget applies, and whether new + running fits in it."""

from __future__ import annotations

import pytest

from metal_agent.core.admission import (
    INSUFFICIENT_MEMORY,
    MEMORY_CHECK_FAILED,
    Admit,
    Reject,
    admit,
    default_memory_fraction,
    memory_budget,
)
from metal_agent.core.api import HardwareSpec
from metal_agent.core.memory import GiB, EstimateFailed, MemoryEstimate


def est(total_gib: float) -> MemoryEstimate:
    """An estimate of `total_gib` (all of it weights, for simple arithmetic)."""
    return MemoryEstimate(int(total_gib * GiB), 0, 0, 2048, "f16", "f16")


@pytest.mark.parametrize("ram_gib,fraction", [(8, 0.67), (24, 0.67), (36, 0.67), (48, 0.75), (128, 0.75)])
def test_default_fraction_depends_on_ram(ram_gib, fraction):
    assert default_memory_fraction(ram_gib * GiB) == fraction


@pytest.mark.parametrize("hardware,agent_fraction,expected_gib,source", [
    (HardwareSpec(memory_budget_bytes=10 * GiB, memory_fraction=0.9), 0.5, 10, "memoryBudget"),
    (HardwareSpec(memory_fraction=0.5), 0.9, 16, "memoryFraction 0.5"),
    (HardwareSpec(), 0.25, 8, "--memory-fraction 0.25"),
    (HardwareSpec(), None, 32 * 0.67, "default fraction 0.67"),
    (None, None, 32 * 0.67, "default fraction 0.67"),
])
def test_budget_precedence(hardware, agent_fraction, expected_gib, source):
    budget = memory_budget(hardware, 32 * GiB, agent_fraction)
    assert budget.bytes == pytest.approx(expected_gib * GiB, abs=1)
    assert source in budget.source


RAM = 32 * GiB  # default budget 21.44 GiB


@pytest.mark.parametrize("needed,running,hardware,outcome", [
    (10, {}, None, Admit),
    (21.44, {}, None, Admit),  # exactly at the budget fits
    (22, {}, None, Reject),
    (10, {"ns/a": 8}, None, Admit),
    (10, {"ns/a": 8, "ns/b": 4}, None, Reject),  # fits alone, not next to the others
    (10, {"ns/new": 20}, None, Admit),  # the service itself (being respawned) does not count
    (10, {"ns/a": 8}, HardwareSpec(memory_budget_bytes=17 * GiB), Reject),
    (10, {"ns/a": 8}, HardwareSpec(memory_fraction=0.6), Admit),
])
def test_new_plus_running_must_fit(needed, running, hardware, outcome):
    result = admit("ns/new", est(needed), {k: int(v * GiB) for k, v in running.items()},
                   hardware=hardware, total_ram_bytes=RAM)
    assert isinstance(result, outcome), result


def test_rejection_names_the_numbers_and_the_services():
    result = admit("ns/new", est(10), {"ns/a": 8 * GiB, "ns/b": 4 * GiB}, hardware=None, total_ram_bytes=RAM)
    assert isinstance(result, Reject) and result.reason == INSUFFICIENT_MEMORY
    assert "needs 10.00 GiB" in result.message
    assert "12.00 GiB already committed by ns/a (8.00 GiB), ns/b (4.00 GiB)" in result.message
    assert "total 22.00 GiB exceeds the budget of 21.44 GiB" in result.message
    assert "0.67 × 32.00 GiB RAM" in result.message
    assert result.blocker().phase == "Pending" and result.blocker().reason == INSUFFICIENT_MEMORY


def test_admission_reports_what_it_counted():
    result = admit("ns/new", est(4), {"ns/a": 8 * GiB}, hardware=None, total_ram_bytes=RAM)
    assert result.needed_bytes == 4 * GiB and result.committed_bytes == 8 * GiB and result.warning is None


def test_unknown_estimate_fails_closed_unless_warn_mode():
    failed = EstimateFailed("the GGUF header has no llama.block_count")
    closed = admit("ns/new", failed, {}, hardware=None, total_ram_bytes=RAM)
    assert isinstance(closed, Reject) and closed.reason == MEMORY_CHECK_FAILED
    assert "llama.block_count" in closed.message and closed.blocker().phase == "Failed"
    warned = admit("ns/new", failed, {"ns/a": GiB}, hardware=None, total_ram_bytes=RAM, mode="warn")
    assert isinstance(warned, Admit) and "llama.block_count" in warned.warning and warned.committed_bytes == GiB


def test_estimate_notes_become_the_admission_warning():
    noted = MemoryEstimate(GiB, 0, 0, 2048, "turbo9", "f16", notes=("unknown KV cache type 'turbo9'",))
    result = admit("ns/new", noted, {}, hardware=None, total_ram_bytes=RAM)
    assert isinstance(result, Admit) and "turbo9" in result.warning
