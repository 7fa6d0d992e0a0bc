"""macOS's thermal state from `pmset -g therm`: is the Mac throttling, so that slow tokens are explained?

`pmset -g therm` needs no privilege, which is why it is read rather than
powermetrics' `thermal` sampler (that one would widen the pinned sudo
grant). It prints up to three things:

- "Thermal warning level set to N." or "Note: No thermal warning level has
  been recorded" (0: none);
- "Performance warning level set to N." or the same Note;
- on Intel Macs, a "CPU Power notify" block with `CPU_Speed_Limit = P`
  (percent of full speed the CPU may run at).

Apple silicon Macs often print only the Notes (exelban/stats#749), so this
reads "no throttling reported" then, not "not throttling"; the README says
so. Throttled means a warning level above 0 or a speed limit under 100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PMSET_THERM = ("/usr/bin/pmset", "-g", "therm")

_THERMAL = re.compile(r"^\s*Thermal warning level set to (\d+)", re.M)
_PERFORMANCE = re.compile(r"^\s*Performance warning level set to (\d+)", re.M)
_SPEED = re.compile(r"^\s*CPU_Speed_Limit\s*=\s*(\d+)", re.M)


@dataclass(frozen=True, slots=True)
class ThermalState:
    thermal_warning: int  # 0: none recorded
    performance_warning: int
    cpu_speed_limit: int | None  # percent; None: not reported (Apple silicon)

    @property
    def throttled(self) -> bool:
        return bool(self.thermal_warning or self.performance_warning
                    or (self.cpu_speed_limit is not None and self.cpu_speed_limit < 100))

    def describe(self) -> str:
        parts = []
        if self.thermal_warning:
            parts.append(f"thermal warning level {self.thermal_warning}")
        if self.performance_warning:
            parts.append(f"performance warning level {self.performance_warning}")
        if self.cpu_speed_limit is not None and self.cpu_speed_limit < 100:
            parts.append(f"CPU speed limited to {self.cpu_speed_limit}%")
        if not parts:
            return "no thermal throttling reported"
        return "macOS is throttling (" + ", ".join(parts) + "): tokens come slower until it cools"


def parse_therm(text: str) -> ThermalState | None:
    """`pmset -g therm`'s output, or None when it is not that output at all."""
    if "warning level" not in text and "CPU_Speed_Limit" not in text:
        return None
    thermal, performance, speed = _THERMAL.search(text), _PERFORMANCE.search(text), _SPEED.findall(text)
    return ThermalState(int(thermal.group(1)) if thermal else 0,
                        int(performance.group(1)) if performance else 0,
                        int(speed[-1]) if speed else None)  # the latest notification wins
