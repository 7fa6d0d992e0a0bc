"""Reading llama-server's own log lines.

The log is the only place llama-server says where the model actually landed:
a Metal build that silently falls back to the CPU still answers /health, just
ten times slower. We parse the offload line so status can say so, and pick
the lines worth quoting when a start fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
# e.g. "load_tensors:        Metal model buffer size = ..." or "CPU_Mapped model buffer size"
_BUFFER = re.compile(r"load_tensors:\s+(\S+?)(?:_Mapped)? model buffer size")
# Printed by builds without a usable GPU backend (or when Metal is unavailable):
# every layer then runs on the CPU, whatever --n-gpu-layers says.
_NO_GPU = re.compile(r"no usable GPU found")
_PROBLEM = re.compile(r"\b(error|failed|failure|unsupported|invalid|unknown|cannot|can't|abort|terminate)", re.I)


@dataclass(frozen=True)
class Acceleration:
    device: str
    layers_offloaded: int
    layers_total: int

    def describe(self) -> str:
        if not self.layers_total:
            return self.device
        return f"{self.device}, {self.layers_offloaded}/{self.layers_total} layers offloaded"

    def as_status(self) -> dict:
        status = {"device": self.device, "layersOffloaded": self.layers_offloaded}
        if self.layers_total:  # 0: the log did not say
            status["layersTotal"] = self.layers_total
        return status


def parse_acceleration(log_text: str) -> Acceleration | None:
    """Acceleration from the last load recorded in `log_text`, or None if it has none."""
    offloads = _OFFLOADED.findall(log_text)
    if not offloads:
        return Acceleration("CPU", 0, 0) if _NO_GPU.search(log_text) else None
    done, total = (int(v) for v in offloads[-1])
    devices = [d for d in _BUFFER.findall(log_text) if d.upper() != "CPU"]
    if done == 0:
        device = "CPU"
    else:
        device = devices[-1] if devices else "GPU"
    return Acceleration(device=device, layers_offloaded=done, layers_total=total)


def problem_lines(log_text: str, limit: int = 5) -> list[str]:
    """The last `limit` lines that look like the reason a start failed."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    problems = [ln for ln in lines if _PROBLEM.search(ln)]
    return problems[-limit:] if problems else lines[-limit:]
