"""Admission: may a service start, given what is already running on this Mac?

A Mac has one pool of memory for CPU and GPU. Starting a model that does not
fit next to the ones already loaded does not fail cleanly: macOS compresses
and swaps, every model on the machine slows to a crawl, and eventually
something is killed. So before spawning we add the new service's estimate to
the estimates of the services this agent already runs and compare the sum
with a budget. (LLMKube's agent compared the new model alone, so two models
that each fit could be started together and not fit.)

Budget, first that applies:
1. the Model's `spec.hardware.memoryBudget` (bytes);
2. the Model's `spec.hardware.memoryFraction` × physical RAM;
3. the agent's `--memory-fraction` × RAM, by default 0.67 up to 36 GiB of
   RAM and 0.75 above. macOS, the window server and the user's apps need a
   roughly fixed few GiB, and Metal by default lets the GPU wire about two
   thirds of RAM on small Macs and three quarters on large ones; the same
   split keeps the agent inside what the GPU may use.

Physical RAM is the memory watchdog's own reading (`hw.memsize` on macOS),
so admission and the watchdog judge the machine by the same numbers.

When the estimate cannot be computed (unreadable header, unknown
architecture), the default is to refuse (`MemoryCheckFailed`): admitting a
model of unknown size is how Macs end up swapping. `mode="warn"` admits it
with a warning, for users who know better than the header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from metal_agent.core.api import HardwareSpec
from metal_agent.core.memory import GiB, EstimateFailed, MemoryEstimate, gib
from metal_agent.core.status import Blocker

INSUFFICIENT_MEMORY = "InsufficientMemory"
MEMORY_CHECK_FAILED = "MemoryCheckFailed"
SMALL_MAC_RAM_BYTES = 36 * GiB
SMALL_MAC_FRACTION = 0.67
LARGE_MAC_FRACTION = 0.75

Mode = Literal["enforce", "warn"]


def default_memory_fraction(total_ram_bytes: int) -> float:
    return SMALL_MAC_FRACTION if total_ram_bytes <= SMALL_MAC_RAM_BYTES else LARGE_MAC_FRACTION


@dataclass(frozen=True, slots=True)
class Budget:
    bytes: int
    source: str  # for messages, e.g. "0.67 × 24.00 GiB RAM, the agent's default"


def memory_budget(hardware: HardwareSpec | None, total_ram_bytes: int,
                  agent_fraction: float | None = None) -> Budget:
    """The budget that applies to a service whose Model has `hardware`."""
    if hardware is not None and hardware.memory_budget_bytes is not None:
        return Budget(hardware.memory_budget_bytes, "the Model's memoryBudget")
    ram = gib(total_ram_bytes)
    if hardware is not None and hardware.memory_fraction is not None:
        fraction = hardware.memory_fraction
        return Budget(int(total_ram_bytes * fraction), f"the Model's memoryFraction {fraction:g} × {ram} RAM")
    if agent_fraction is not None:
        return Budget(int(total_ram_bytes * agent_fraction), f"--memory-fraction {agent_fraction:g} × {ram} RAM")
    fraction = default_memory_fraction(total_ram_bytes)
    return Budget(int(total_ram_bytes * fraction), f"the agent's default fraction {fraction:g} × {ram} RAM")


@dataclass(frozen=True, slots=True)
class Admit:
    needed_bytes: int  # this service's estimate (0 when unknown and admitted in warn mode)
    committed_bytes: int  # the other running services' estimates
    budget: Budget
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str  # INSUFFICIENT_MEMORY or MEMORY_CHECK_FAILED (LLMKube's schedulingStatus values)
    message: str
    shortfall_bytes: int = 0  # how much more the budget would need (0: unknown)

    def blocker(self) -> Blocker:
        """As a status blocker. Too little memory may change when another service stops
        (phase Pending); an estimate that cannot be made will not (phase Failed)."""
        return Blocker(self.reason, self.message, phase="Pending" if self.reason == INSUFFICIENT_MEMORY else "Failed")


def admit(
    key: str,
    estimate: MemoryEstimate | EstimateFailed,
    running: Mapping[str, int],
    *,
    hardware: HardwareSpec | None,
    total_ram_bytes: int,
    agent_fraction: float | None = None,
    mode: Mode = "enforce",
) -> Admit | Reject:
    """Decide whether service `key` may start.

    `running` maps the keys of services this agent runs now to their
    estimated bytes; `key` itself is ignored there (a respawn replaces it).
    """
    budget = memory_budget(hardware, total_ram_bytes, agent_fraction)
    others = {k: v for k, v in running.items() if k != key}
    committed = sum(others.values())

    if isinstance(estimate, EstimateFailed):
        if mode == "warn":
            return Admit(0, committed, budget, warning=f"memory check skipped: {estimate.message}")
        return Reject(MEMORY_CHECK_FAILED,
                      f"cannot estimate the memory this service needs: {estimate.message}; "
                      "refusing to start it (run the agent with the memory check in warn mode to override)")

    needed = estimate.total_bytes
    if needed + committed <= budget.bytes:
        return Admit(needed, committed, budget, warning="; ".join(estimate.notes) or None)

    if others:
        listed = ", ".join(f"{k} ({gib(v)})" for k, v in sorted(others.items(), key=lambda kv: (-kv[1], kv[0])))
        already = f"{gib(committed)} already committed by {listed}"
    else:
        already = "nothing else running"
    return Reject(INSUFFICIENT_MEMORY,
                  f"needs {gib(needed)} ({estimate.describe()}); {already}; "
                  f"total {gib(needed + committed)} exceeds the budget of {gib(budget.bytes)} ({budget.source})",
                  shortfall_bytes=needed + committed - budget.bytes)
