"""What memory pressure means for each service now, shared by the parts that act on it.

Built before the watchdog, the guard and the reconciler, so that none of them
needs another to exist first: the pressure responder writes the level and the
evicted set (on the watchdog's word), the guard writes who waits for memory,
and the reconciler and the status read all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metal_agent.core.conditions import Condition
from metal_agent.core.pressure import Level


@dataclass
class MemoryState:
    level: Level = Level.NORMAL
    evicted: set[str] = field(default_factory=set)  # stopped by the watchdog; shown as MemoryPressure=Evicted
    waiting: set[str] = field(default_factory=set)  # memory admission holds them back (re-queued when memory frees)
    skip_message: str = ""  # why the watchdog did not evict, said in MemoryPressure while the level lasts

    def condition(self, key: str) -> Condition:
        """The MemoryPressure condition of `key`."""
        if key in self.evicted:
            return Condition("MemoryPressure", True, "Evicted",
                             "stopped to relieve memory pressure; restarts when pressure is Normal")
        level = self.level
        message = f"memory pressure on this Mac is {level.label}"
        if self.skip_message and level is not Level.NORMAL:
            message += f"; nothing evicted: {self.skip_message}"
        return Condition("MemoryPressure", level is not Level.NORMAL, level.label, message)
